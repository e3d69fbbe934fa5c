"""``train.init_from``: start training (fine-tuning) from existing weights instead of a random init.

Any checkpoint ``jaxllama convert`` reads works: a Hugging Face folder, a Meta folder, a GGUF file
(dequantized), or a jaxllama params dir / training run. Only the parameters are taken; the optimizer
state and the step start fresh (that is what distinguishes this from resuming a run).

Placement: a jaxllama checkpoint is read by Orbax straight into this run's shards; the other formats
are read into host memory by the converter (each process reads the whole model) and then each device
receives only its shard (``jax.make_array_from_callback``), so no device ever holds a full copy.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxllama.config import SHAPE_FIELDS, Config, ModelConfig
from jaxllama.errors import ConfigError
from jaxllama.parallel.sharding import place

# Fields that change what the model computes without changing shapes: a difference is reported, and the
# config wins (extending the context with another rope_theta is a legitimate fine-tuning choice).
FUNCTION_FIELDS = ("rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                   "rope_original_max_position", "norm_eps")


def load_train_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """:func:`jaxllama.config.load_config` for fine-tuning (what ``train``, ``info`` and ``compile-check``
    use): with ``train.init_from`` and no ``model.preset`` the architecture comes from the checkpoint, and
    without ``data.tokenizer`` (and a file source) its tokenizer folder does too (with its chat template)."""
    from jaxllama.config import load_config
    from jaxllama.convert.api import checkpoint_model_config, checkpoint_tokenizer

    cfg = load_config(path, overrides, checkpoint_model=checkpoint_model_config)
    if cfg.train.init_from and not cfg.data.tokenizer and cfg.data.source not in ("stdlib", "synthetic"):
        tok = checkpoint_tokenizer(cfg.train.init_from)
        if tok is None:
            raise ConfigError(f"data.tokenizer: required: train.init_from {cfg.train.init_from} carries no tokenizer")
        cfg.data.tokenizer = tok
    return cfg


def compare_models(stored: ModelConfig, cfg: ModelConfig, where: str, say: Callable[[str], None],
                   key: str = "train.init_from") -> None:
    """Shape differences are an error naming every field; other architecture differences are reported."""
    def diff(fields):
        return [f"model.{k}: checkpoint {getattr(stored, k)!r}, config {getattr(cfg, k)!r}"
                for k in fields if getattr(stored, k) != getattr(cfg, k)]

    shapes = diff(SHAPE_FIELDS)
    if shapes:
        raise ConfigError(f"{key}: {where} does not fit the model config: {'; '.join(shapes)} "
                          "(set model.preset or the model.* fields to the checkpoint's)")
    scaled = "llama3" in (stored.rope_type, cfg.rope_type)  # the factors mean nothing without llama3 scaling
    others = diff(f for f in FUNCTION_FIELDS if scaled or not f.startswith(("rope_factor", "rope_low", "rope_high",
                                                                             "rope_original")))
    if others:
        say(f"{key}: {where} differs from the config in {'; '.join(others)}; training uses the config's")


def initial_params(cfg: Config, shardings: Any, say: Callable[[str], None] = print, path: str | None = None,
                   key: str = "train.init_from") -> Any:
    """The parameters of ``path`` (default ``cfg.train.init_from``; ``key`` names the setting in errors), in
    ``model.param_dtype``, placed per ``shardings``."""
    from jaxllama.convert.api import detect_format

    path = path or cfg.train.init_from
    dtype = jax.numpy.dtype(cfg.model.param_dtype)
    try:
        fmt = detect_format(path)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    if fmt == "jaxllama":
        from jaxllama.checkpoint import load_params
        from jaxllama.checkpoint.params import load_model_config

        compare_models(load_model_config(path), cfg.model, path, say, key)  # before reading any array
        params, _ = load_params(path, shardings=shardings, dtype=dtype)
        return params
    from jaxllama.convert.api import load_model

    loaded = load_model(path)
    compare_models(loaded.model_cfg, cfg.model, path, say, key)
    return place(loaded.params, shardings, dtype)
