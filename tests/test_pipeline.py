"""The text pipeline end to end: sources, per-process sharding, determinism, exact resume, eval split."""

import json
import os

import numpy as np
import pytest

from helpers import packed_segments
from jaxllama.data.sources import make_source
from jaxllama.errors import ConfigError, JaxllamaError

BOS = 1  # the SentencePiece models trained here: <unk> <s> </s> <pad> = 0..3
WORDS = "river mill mountain snow bread lamp window garden stone letter market bridge".split()


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) for i in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from jaxllama.data.tokenizers import train_sentencepiece

    out = tmp_path_factory.mktemp("tok") / "sp.model"
    train_sentencepiece(_texts(300, seed=9) + WORDS * 5, vocab_size=320, output=str(out))
    return str(out)


@pytest.fixture
def cfg(make_cfg, sp_model):
    def build(source, **data):
        overrides = {"data.source": source, "data.tokenizer": sp_model, "data.seq_len": 32, "data.global_batch": 4,
                     "data.prefetch": 2, "data.shuffle_buffer": 16, "model.preset": "debug", "model.vocab_size": 512}
        overrides.update({f"data.{k}": v for k, v in data.items()})
        return make_cfg(*(f"{k}={v}" for k, v in overrides.items()))
    return build


def _write_text_files(root, texts):
    root.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (root / f"{i:03d}.txt").write_text(t)
    return str(root / "*.txt")


def _segments(batches):
    """Every packed segment's token ids (inputs then the last target), as tuples."""
    return [tuple(row["tokens"][m]) + (int(row["targets"][m][-1]),) for row, m in packed_segments(batches)]


def _take(src, n):
    return [next(src) for _ in range(n)]


def _expected_segments(sp_model, texts, seq_len=32):
    from jaxllama.data.tokenizers import load_tokenizer

    tok = load_tokenizer(sp_model)
    segs = []
    for t in texts:
        ids = tok.encode(t)
        for start in range(0, len(ids) - 1, seq_len):
            segs.append(tuple(ids[start:start + seq_len + 1]))
    return segs


def test_text_files_one_epoch_has_every_document_once(tmp_path, cfg, sp_model):
    texts = _texts(40)
    pattern = _write_text_files(tmp_path / "docs", texts)
    c = cfg(pattern, eval_source=pattern)  # eval: one pass, no shuffle, then StopIteration
    batches = list(make_source(c, split="eval"))
    assert sorted(_segments(batches)) == sorted(_expected_segments(sp_model, texts))
    eff = sum(b["loss_mask"].sum() for b in batches) / sum(b["loss_mask"].size for b in batches)
    assert 0.5 < eff <= 1.0


@pytest.mark.parametrize("fmt", ["lines", "jsonl", "tfrecord"])
def test_lines_jsonl_and_tfrecord_sources(tmp_path, cfg, sp_model, fmt):
    texts = _texts(30, seed=3)
    path = tmp_path / f"data.{fmt}"
    if fmt == "lines":
        path.write_text("\n".join(texts) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    else:
        import tensorflow as tf

        with tf.io.TFRecordWriter(str(path)) as w:
            for t in texts:
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "body": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))}))
                w.write(ex.SerializeToString())
    c = cfg(str(path), eval_source=str(path), format=fmt, text_key="body")
    batches = list(make_source(c, split="eval"))
    assert sorted(_segments(batches)) == sorted(_expected_segments(sp_model, texts))


def test_tfds_source(tmp_path, cfg, sp_model):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    texts = _texts(50, seed=5)
    ds = tf.data.Dataset.from_tensor_slices({"text": texts})
    tfds.dataset_builders.TfDataBuilder(
        name="jltiny", config="plain", version="1.0.0", data_dir=str(tmp_path),
        split_datasets={"train": ds.take(40), "validation": ds.skip(40)},
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()})).download_and_prepare()
    c = cfg("tfds:jltiny/plain:1.0.0", tfds_data_dir=str(tmp_path), eval_source="tfds:jltiny/plain:1.0.0")
    val = list(make_source(c, split="eval"))
    assert sorted(_segments(val)) == sorted(_expected_segments(sp_model, texts[40:]))
    train = make_source(c)
    assert sorted(_segments(_take(train, 3)))  # reads and packs the train split
    with pytest.raises(ConfigError, match="not a split"):
        make_source(cfg("tfds:jltiny/plain:1.0.0", tfds_data_dir=str(tmp_path), split="test"))
    with pytest.raises(ConfigError, match="tfds_data_dir"):
        make_source(cfg("tfds:jltiny/plain:1.0.0", tfds_data_dir=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="text_key"):
        make_source(cfg("tfds:jltiny/plain:1.0.0", tfds_data_dir=str(tmp_path), text_key="body"))


@pytest.mark.parametrize("n_procs", [2, 4])
@pytest.mark.parametrize("n_files", [1, 6])
def test_processes_read_disjoint_shards(tmp_path, cfg, sp_model, n_files, n_procs):
    """By file with >= as many files as processes, else by element; together they cover the source."""
    texts = _texts(36, seed=7)
    root = tmp_path / "d"
    root.mkdir()
    per = len(texts) // n_files
    for f in range(n_files):
        (root / f"{f}.txt").write_text("\n".join(texts[f * per:(f + 1) * per]) + "\n")
    c = cfg(str(root / "*.txt"), eval_source=str(root / "*.txt"), format="lines", global_batch=4)
    shards = [_segments(list(make_source(c, split="eval", process_index=p, process_count=n_procs)))
              for p in range(n_procs)]
    # A document's first piece starts with BOS and "doc N:", unique to it (later pieces of different
    # documents may coincide: a 12-word vocabulary); the multiset check below covers every piece.
    heads = [{seg for seg in shard if seg[0] == BOS} for shard in shards]
    assert all(heads) and sum(map(len, heads)) == len(texts)
    for i in range(n_procs):
        for j in range(i + 1, n_procs):
            assert not heads[i] & heads[j]
    assert sorted(sum(shards, [])) == sorted(_expected_segments(sp_model, texts))
    first = next(make_source(c, split="eval", process_index=n_procs - 1, process_count=n_procs))
    assert first["tokens"].shape == (4 // n_procs, 32)  # this process's share of the global batch of 4


def test_same_seed_same_batches_and_epochs_roll_over(tmp_path, cfg):
    pattern = _write_text_files(tmp_path / "docs", _texts(12))
    a, b = make_source(cfg(pattern)), make_source(cfg(pattern))
    xs, ys = _take(a, 12), _take(b, 12)  # 12 documents fill far fewer than 12 batches: several epochs
    assert a.state()["epoch"] >= 1
    for x, y in zip(xs, ys):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = cfg(pattern)
    c.train.seed = 1
    zs = _take(make_source(c), 12)
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(xs, zs))


@pytest.mark.parametrize("packing", ["pack", "concat"])
def test_resume_sees_exactly_the_batches_it_would_have_seen(tmp_path, cfg, packing):
    pattern = _write_text_files(tmp_path / "docs", _texts(25))
    c = cfg(pattern, packing=packing)
    straight = make_source(c)
    want = _take(straight, 19)  # crosses epoch boundaries
    first = make_source(c)
    _take(first, 7)
    saved = json.loads(json.dumps(first.state()))  # a state survives JSON
    _take(first, 3)  # the interrupted run went further before dying
    first.close()
    resumed = make_source(c)
    resumed.restore(saved)
    got = _take(resumed, 12)
    for x, y in zip(want[7:], got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(JaxllamaError, match="process 0 of 1"):
        make_source(c, process_index=1, process_count=2).restore(saved)


def test_eval_fraction_holds_out_documents_from_training(tmp_path, cfg):
    texts = _texts(60, seed=11)
    pattern = _write_text_files(tmp_path / "docs", texts)
    c = cfg(pattern, eval_fraction=0.25)
    ev = set(_segments(list(make_source(c, split="eval"))))
    tr = make_source(c)
    train_segs = set(_segments(_take(tr, 40)))
    assert ev and train_segs and not ev & train_segs
    with pytest.raises(ConfigError, match="no eval data"):
        make_source(cfg(pattern), split="eval")


def _example(**features):
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in features.items()})).SerializeToString()


def _tfrecord(path, records):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as w:
        for r in records:
            w.write(r)


GOOD = json.dumps({"text": "a fine document about the river mill"}) + "\n"
# name -> (file name, content: bytes, or a list of serialized records for a TFRecord, or a callable)
BAD_FILES = {
    "empty_text": ("empty.txt", b"", r"empty.txt: empty file"),
    "empty_jsonl": ("empty.jsonl", b"", r"empty.jsonl: empty file"),
    "invalid_utf8_text": ("latin.txt", "line one\ncaf\u00e9\n".encode("latin-1"), r"latin.txt:2: invalid UTF-8 \(byte 0xe9\)"),
    "invalid_utf8_jsonl": ("bytes.jsonl", GOOD.encode() + b'{"text": "\xff"}\n', r"bytes.jsonl:2: invalid UTF-8"),
    "not_json": ("bad.jsonl", (GOOD + "{not json\n").encode(), r"bad.jsonl:2: not valid JSON"),
    "json_not_object": ("list.jsonl", (GOOD + "[1, 2]\n").encode(), r"list.jsonl:2: no key 'text'"),
    "missing_key": ("nokey.jsonl", (json.dumps({"body": "x y z"}) + "\n").encode(), r"nokey.jsonl:1: no key 'text'"),
    "text_not_string": ("num.jsonl", (GOOD + '{"text": 7}\n').encode(), r"num.jsonl:2: 'text' is a int, not a string"),
    "tfrecord_missing_key": ("a.tfrecord", [_example(text=b"fine words"), _example(body=b"x")],
                             r"a.tfrecord:record 2: no single bytes feature 'text'"),
    "tfrecord_truncated": ("t.tfrecord", lambda p: p.write_bytes(p.read_bytes()[:-7]),
                           r"t.tfrecord:record 2: unreadable TFRecord"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, cfg, case):
    name, content, message = BAD_FILES[case]
    path = tmp_path / name
    if callable(content):  # a damaged copy of a good two-record file
        _tfrecord(path, [_example(text=b"one short document"), _example(text=b"another document")])
        content(path)
    elif isinstance(content, list):
        _tfrecord(path, content)
    else:
        path.write_bytes(content)
    src = make_source(cfg(str(path), eval_source=str(path)), split="eval")
    with pytest.raises(JaxllamaError, match=message) as e:
        list(src)
    assert "\n" not in str(e.value) and "skip_bad_records" in str(e.value)


def test_skip_bad_records_skips_and_counts(tmp_path, cfg, sp_model):
    texts = _texts(6, seed=4)
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": t}) for t in texts]
    lines[1:1] = ["{not json", json.dumps({"body": "no text key"})]
    path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    src = make_source(cfg(str(path), eval_source=str(path), skip_bad_records=True), split="eval")
    batches = list(src)
    assert sorted(_segments(batches)) == sorted(_expected_segments(sp_model, texts))
    assert src.bad.count == 3 and "mixed.jsonl:9: invalid UTF-8" in src.bad.last


def test_bad_sources_and_settings_are_one_line_errors(tmp_path, cfg):
    with pytest.raises(ConfigError, match="no files match"):
        make_source(cfg(str(tmp_path / "nothing*.txt")))
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD)
    with pytest.raises(ConfigError, match="data.tokenizer: required"):
        c = cfg(str(good))
        c.data.tokenizer = None
        make_source(c)
    with pytest.raises(ConfigError, match="model.vocab_size is 100"):
        c = cfg(str(good))
        c.model.vocab_size = 100
        make_source(c)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(JaxllamaError, match="got no documents"):
        next(make_source(cfg(str(empty / "*.txt"), skip_bad_records=True)))
    with pytest.raises(ConfigError, match="no key 'text'"):  # training reports it too, not only eval
        (tmp_path / "k.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
        next(make_source(cfg(str(tmp_path / "k.jsonl"))))


def test_stdlib_source_uses_the_cached_demo_tokenizer(monkeypatch, tmp_path, make_cfg, sp_model):
    """No tokenizer configured: stdlib trains (or here, finds) the cached one sized to the model."""
    import shutil

    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path))
    shutil.copy(sp_model, tmp_path / "stdlib-sp-320.model")  # pretend an earlier run trained it
    c = make_cfg("data.source=stdlib", "model.vocab_size=320", "data.global_batch=4")
    batch = next(make_source(c))
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].max() < 320
    assert os.listdir(tmp_path) == ["stdlib-sp-320.model"]


def test_a_run_keeps_its_tokenizer_so_generate_and_convert_find_it(tmp_path, cfg, sp_model):
    from jaxllama.convert.api import load_model
    from jaxllama.train.loop import train

    c = cfg(_write_text_files(tmp_path / "docs", _texts(40)))
    c.run_dir, c.train.steps, c.train.tensorboard, c.train.progress = str(tmp_path / "run"), 2, False, False
    c.mesh.fsdp, c.mesh.tensor = 4, 2
    train(c, out=lambda _: None)
    kept = tmp_path / "run" / "tokenizer" / "tokenizer.model"
    assert kept.read_bytes() == open(sp_model, "rb").read()
    assert load_model(str(tmp_path / "run")).tokenizer_path == str(kept.parent)
    # a step of the run (generate RUN_DIR/checkpoints/2) finds the run's tokenizer too
    assert load_model(str(tmp_path / "run" / "checkpoints" / "2")).tokenizer_path == str(kept.parent)


def test_training_logs_how_many_bad_records_it_skipped(tmp_path, cfg):
    from jaxllama.train.loop import train

    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": t}) for t in _texts(30)]
    lines[3:3] = ["{not json", json.dumps({"body": "no text key"})]
    path.write_text("\n".join(lines) + "\n")
    c = cfg(str(path), skip_bad_records=True)
    c.run_dir, c.train.steps, c.train.log_every, c.train.tensorboard, c.train.progress = \
        str(tmp_path / "run"), 2, 1, False, False
    c.mesh.fsdp, c.mesh.tensor, c.checkpoint.enabled = 4, 2, False
    said = []
    train(c, out=said.append)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data_skipped"] == 2
    assert any("skipped 2 bad records" in s and "mixed.jsonl:5: no key 'text'" in s for s in said)
