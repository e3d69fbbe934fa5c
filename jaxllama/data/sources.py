"""``data.source`` -> a :class:`BatchSource`: this process's numpy batches, with an exact position.

Batches are dicts of [local_batch, seq_len] arrays (:mod:`jaxllama.data.batch`), where local_batch
= global_batch / process_count. TensorFlow is imported only when a text source is built, so the
synthetic source (benchmarks, the GPU machine) needs none.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np

from jaxllama.config import Config
from jaxllama.data.corpus import SourceSpec
from jaxllama.errors import ConfigError

SYNTHETIC_EVAL_BATCHES = 8
# The stdlib corpus (~25 MB of Python) supports a tokenizer of about this size; a larger model (a Llama
# preset on the demo text) leaves the rest of its embedding rows unused.
STDLIB_MAX_VOCAB = 8192
EVAL_SEED_OFFSET = 1_000_003  # synthetic eval batches come from a different stream than training's


class BatchSource(Protocol):
    """What the training loop and the evaluators ask of a data source (text or synthetic)."""

    tok: Any  # the tokenizer (copied into the run dir), or None
    efficiency: float | None  # real tokens / slots of the last batch (packing), or None
    bad: Any  # a BadRecords counter (data.skip_bad_records), or None

    def __next__(self) -> dict[str, np.ndarray]: ...
    def describe(self) -> str: ...
    def state(self) -> dict: ...  # JSON-serializable position after the last batch handed out
    def restore(self, state: dict) -> None: ...
    def empty_batch(self) -> dict[str, np.ndarray]: ...  # padding only: a dry process's share of an eval
    def close(self) -> None: ...


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ConfigError(f"data.global_batch={global_batch} must be divisible by the {process_count} processes")
    return global_batch // process_count


def make_source(cfg: Config, split: str = "train", process_index: int | None = None,
                process_count: int | None = None, one_pass: bool = False) -> BatchSource:
    """The batch iterator for ``split`` ("train": endless; "eval": one pass over the eval documents;
    ``one_pass``: the training documents once, unshuffled, e.g. for a DPO reference cache).

    Eval data is ``data.eval_source`` when set, else the held-out ``data.eval_fraction`` of
    ``data.source``; asking for eval with neither is a one-line error.
    """
    d = cfg.data
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    local = local_batch_size(d.global_batch, pc)
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r}")
    key, spec_text, tfds_split, holdout = "data.source", d.source, d.split, None
    if split == "eval":
        if d.eval_source:
            key, spec_text, tfds_split = "data.eval_source", d.eval_source, d.eval_split
        elif d.eval_fraction > 0:
            holdout = "eval"
        else:
            raise ConfigError("no eval data: set data.eval_source or data.eval_fraction")
    elif d.eval_fraction > 0 and not d.eval_source:
        holdout = "train"
    spec = parse_source(spec_text, key)
    if spec.kind == "synthetic":
        from jaxllama.data.synthetic import SyntheticSource

        seed = cfg.train.seed + (EVAL_SEED_OFFSET if split == "eval" else 0)
        limit = (cfg.train.eval_batches or SYNTHETIC_EVAL_BATCHES) if split == "eval" else None
        return SyntheticSource(cfg.model.vocab_size, d.seq_len, d.global_batch, seed=seed,
                               process_index=pi, process_count=pc, limit=limit)
    from jaxllama.data.pipeline import TextSource

    tok = open_tokenizer(cfg, spec.kind)
    return TextSource(spec, d, tok, local_batch=local, seed=cfg.train.seed, process_index=pi, process_count=pc,
                      split=tfds_split, holdout=holdout, finite=split == "eval" or one_pass, key=key)


def parse_source(text: str, key: str = "data.source") -> SourceSpec:
    return SourceSpec.parse(text, key)


def open_tokenizer(cfg: Config, kind: str = "stdlib"):
    """``data.tokenizer``, or for the stdlib corpus the cached demo tokenizer sized to the model's vocab."""
    from jaxllama.data.tokenizers import cached_stdlib_tokenizer, load_tokenizer

    d, vocab = cfg.data, cfg.model.vocab_size
    if d.tokenizer:
        path = d.tokenizer
    elif kind == "stdlib":
        path = cached_stdlib_tokenizer(min(vocab, STDLIB_MAX_VOCAB))
    else:
        raise ConfigError("data.tokenizer: required for a text source (a SentencePiece/tiktoken tokenizer.model "
                          "or a tokenizer.json; `jaxllama tokenizer train` makes one)")
    tok = load_tokenizer(path)
    if tok.vocab_size > vocab:
        raise ConfigError(f"data.tokenizer: {path} has {tok.vocab_size} tokens but model.vocab_size is {vocab}")
    return tok
