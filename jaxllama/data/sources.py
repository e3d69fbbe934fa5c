"""``data.source`` -> an iterator of per-process numpy batches. TensorFlow-backed sources import lazily."""

from __future__ import annotations

from typing import Any

import jax

from jaxllama.config import Config
from jaxllama.data.synthetic import SyntheticSource
from jaxllama.errors import ConfigError


def make_source(cfg: Config) -> Any:
    """The training batch iterator for ``cfg`` on this process."""
    src = cfg.data.source
    if src == "synthetic":
        return SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.global_batch, seed=cfg.train.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    raise ConfigError(f"data.source: {src!r} is not available yet; supported: synthetic")
