"""``data.source`` -> a tf.data dataset of document strings for one process and one epoch.

Sharding over processes: by file when there are at least as many files as processes (each process
reads whole files, no wasted reads), else by element (``Dataset.shard``; TFDS uses
``tfds.split_for_jax_process``). Shuffling is seeded: the file order is permuted per epoch and a
document buffer is shuffled with a seed derived from (seed, epoch), so the same seed and process
layout give the same documents in the same order, run after run.

A record larger than ``data.max_record_bytes`` (a JSONL line, a TFRecord record, a text file) is a
bad record, refused before it is tokenized: one 50 MB line would take minutes and gigabytes.

A held-out eval fraction is chosen by a hash of the document text, so it does not depend on the
order, the epoch or the number of processes, and train and eval never share a document.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import tensorflow as tf

from jaxllama.config import MAX_RECORD_BYTES, DataConfig
from jaxllama.data.chat_data import sized_documents
from jaxllama.data.corpus import (BadRecords, SourceSpec, file_format, read_chat_documents, read_documents,
                                  resolve_files, stdlib_files)
from jaxllama.errors import ConfigError

HOLDOUT_BUCKETS = 10_000


def documents(spec: SourceSpec, d: DataConfig, *, epoch: int, seed: int, shuffle: bool, process_index: int,
              process_count: int, split: str, holdout: str | None = None, key: str = "data.source",
              bad: BadRecords | None = None, encoder=None) -> tf.data.Dataset:
    """This process's documents (tf.string scalars) for one epoch, shuffled if asked.

    ``holdout``: None (all documents), "train" (without the held-out fraction) or "eval" (only it).
    ``bad``: where bad file records go (an error unless ``data.skip_bad_records``). ``encoder``
    (chat formats): records become encoded documents (ids and loss mask as bytes) in the reader,
    which knows each record's file:line.
    """
    if spec.kind == "tfds":
        ds = _tfds_documents(spec.name, d, split, epoch, seed, shuffle, process_index, process_count, key)
    else:
        files = stdlib_files() if spec.kind == "stdlib" else resolve_files(spec.pattern, key)
        fmt = "text" if spec.kind == "stdlib" else d.format
        if shuffle:
            files = [files[i] for i in np.random.default_rng([seed, epoch, 17]).permutation(len(files))]
        by_file = len(files) >= process_count
        if by_file:
            files = files[process_index::process_count]
        ds = _file_documents(files, fmt, d.text_key, bad or BadRecords(), lenient=spec.kind == "stdlib",
                             encoder=encoder, max_bytes=d.max_record_bytes)
        if not by_file:
            ds = ds.shard(process_count, process_index)
    if holdout is not None and d.eval_fraction > 0:
        cut = int(round(d.eval_fraction * HOLDOUT_BUCKETS))
        in_eval = lambda text: tf.strings.to_hash_bucket_fast(text, HOLDOUT_BUCKETS) < cut  # noqa: E731
        ds = ds.filter(in_eval if holdout == "eval" else lambda text: tf.logical_not(in_eval(text)))
    if shuffle:
        ds = ds.shuffle(d.shuffle_buffer, seed=_seed(seed, epoch), reshuffle_each_iteration=False)
    return ds


def _seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 29]).integers(0, 2**31 - 1))


def _file_documents(files: list[str], fmt: str, text_key: str, bad: BadRecords, lenient: bool,
                    encoder=None, max_bytes: int = MAX_RECORD_BYTES) -> tf.data.Dataset:
    """Documents read in plain Python, so a bad record is reported with its file and line (or record
    number) or skipped and counted; tokenizing, the expensive part, stays parallel in tf.data. A
    record over ``max_bytes`` is a bad record (chat formats: the encoder's own bound, by file:line)."""
    limit = SimpleNamespace(max_record_bytes=max_bytes)

    def generate():
        for f in files:
            if encoder is not None:
                yield from read_chat_documents(f, encoder, bad)
            elif file_format(f, fmt) == "tfrecord":
                yield from _tfrecord_documents(f, text_key, bad, max_bytes)
            else:
                docs = read_documents(f, fmt, text_key, bad, lenient=lenient, max_bytes=max_bytes)
                yield from (text for _, text in sized_documents(f, docs, limit, bad))

    return tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec([], tf.string))


def _tfrecord_documents(path: str, text_key: str, bad: BadRecords, max_bytes: int = MAX_RECORD_BYTES):
    """``tf.train.Example`` records of one file: the bytes feature ``text_key``, as UTF-8 text."""
    n = 0
    try:
        for n, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator(), 1):
            if len(raw) > max_bytes:  # before parsing the Example
                bad(f"{path}:record {n}", f"{len(raw)} bytes, larger than data.max_record_bytes={max_bytes} "
                    "(raise it for records this large)")
                continue
            feature = tf.train.Example.FromString(raw).features.feature.get(text_key)
            values = feature.bytes_list.value if feature is not None else []
            if len(values) != 1:
                bad(f"{path}:record {n}", f"no single bytes feature {text_key!r} (set data.text_key)")
                continue
            try:
                yield values[0].decode("utf-8")
            except UnicodeDecodeError:
                bad(f"{path}:record {n}", "invalid UTF-8")
    except tf.errors.OpError as e:  # a truncated or corrupt file: the rest of it is unreadable
        bad(f"{path}:record {n + 1}", f"unreadable TFRecord ({e.message.splitlines()[0]})")
    if n == 0:
        bad(path, "no records")


def check_source(spec: SourceSpec, d: DataConfig, split: str, key: str = "data.source") -> None:
    """Fail early, with one line, on what would otherwise fail inside the reader thread."""
    if spec.kind == "tfds":
        _tfds_builder(spec.name, d, split, key)
    elif spec.kind == "files":
        resolve_files(spec.pattern, key)


def _tfds_builder(name: str, d: DataConfig, split: str, key: str):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=d.tfds_data_dir)
    except Exception as e:  # unknown name or version: TFDS raises several types
        where = d.tfds_data_dir or "the default TFDS data dir"
        raise ConfigError(f"{key}: tfds:{name}: {str(e).splitlines()[0]} (looked in {where}; set "
                          "data.tfds_data_dir to where it was prepared)") from None
    if not builder.is_prepared():
        where = d.tfds_data_dir or "the default TFDS data dir"
        raise ConfigError(f"{key}: tfds:{name} is not prepared in {where} (set data.tfds_data_dir; "
                          "this machine cannot download)")
    if split not in builder.info.splits:
        which = "data.eval_split" if key == "data.eval_source" else "data.split"
        raise ConfigError(f"{which}: {split!r} is not a split of tfds:{name} "
                          f"(has {', '.join(sorted(builder.info.splits))})")
    features = builder.info.features
    if hasattr(features, "keys") and d.text_key not in features.keys():
        raise ConfigError(f"data.text_key: {d.text_key!r} is not a feature of tfds:{name} "
                          f"(has {', '.join(sorted(features.keys()))})")
    return builder


def _tfds_documents(name: str, d: DataConfig, split: str, epoch: int, seed: int, shuffle: bool,
                    process_index: int, process_count: int, key: str) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, d, split, key)
    sub = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
    options = tf.data.Options()
    options.deterministic = True
    read = tfds.ReadConfig(shuffle_seed=_seed(seed, epoch) if shuffle else None, options=options)
    ds = builder.as_dataset(split=sub, shuffle_files=shuffle, read_config=read)
    return ds.map(lambda ex: ex[d.text_key])
