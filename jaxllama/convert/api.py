"""Format detection, ``load_model`` (for inference) and ``convert`` (for ``jaxllama convert``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxllama.config import ModelConfig
from jaxllama.convert.common import Source, keep_until_exit, parse_dtype, stacked_params  # noqa: F401
from jaxllama.errors import ConfigError

FORMATS = ("hf", "meta", "gguf", "jaxllama")
ADAPTER_FORMATS = ("peft",)  # --to peft: a LoRA adapter alone
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_0", "q4_k_m", "q4_k", "q4_1", "q4_0")  # --gguf-type


def detect_format(path: str | Path) -> str:
    """``hf`` (config.json), ``meta`` (params.json), ``gguf`` (a .gguf file) or ``jaxllama`` (Orbax dirs)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file or folder")
    try:
        return _detect(p)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None


def _detect(p: Path) -> str:
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ConfigError(f"{p}: unknown checkpoint format (a file that is not GGUF; expected a .gguf file or a "
                          f"Hugging Face, Meta or jaxllama folder)")
    if (p / "config.json").is_file():
        return "hf"
    if (p / "params.json").is_file():
        return "meta"
    if ((p / "params").is_dir() and (p / "model").is_dir()) or (p / "checkpoints").is_dir() or \
            any(c.is_dir() and c.name.isdigit() for c in p.iterdir()):
        return "jaxllama"
    raise ConfigError(f"{p}: unknown checkpoint format (no config.json, params.json, params/ + model/ or "
                      f"checkpoints/; a GGUF model is a single .gguf file)")


def open_source(path: str | Path, dtype: np.dtype | str | None = None) -> Source:
    """A lazy reader of the checkpoint at ``path`` (format detected); use it as a context manager."""
    if isinstance(dtype, str) or dtype is None:
        dtype = parse_dtype(dtype)
    from jaxllama.convert import adapters

    if adapters.is_adapter(path):  # a LoRA run (or PEFT folder): its base with the adapter folded in
        return adapters.open_merged(path, None, dtype)
    fmt = detect_format(path)
    if fmt == "hf":
        from jaxllama.convert.hf import HFSource

        return HFSource(path, dtype)
    if fmt == "meta":
        from jaxllama.convert.meta import MetaSource

        return MetaSource(path, dtype)
    if fmt == "gguf":
        from jaxllama.convert.gguf_format import GGUFSource

        return GGUFSource(path, dtype)
    from jaxllama.convert.jaxllama_format import JaxllamaSource

    return JaxllamaSource(path, dtype)


def checkpoint_model_config(path: str) -> ModelConfig:
    """The architecture of any checkpoint, reading metadata only (no tensor)."""
    if detect_format(path) == "jaxllama":
        from jaxllama.checkpoint.params import load_model_config

        return load_model_config(path)
    with open_source(path) as src:
        return src.model_cfg


def checkpoint_tokenizer(path: str) -> str | None:
    """The folder of tokenizer files that comes with a checkpoint (a GGUF's is rebuilt into a temporary
    folder kept until the process exits), or None."""
    src = open_source(path)
    try:
        tok = src.extras.tokenizer_dir
        if tok is not None and src.extras.cleanup:
            keep_until_exit(list(src.extras.cleanup))
            src.extras.cleanup.clear()
        return str(tok) if tok is not None else None
    finally:
        src.close()


@dataclass
class LoadedModel:
    """A model ready for inference.

    ``params`` is the canonical Flax tree (numpy arrays; layers stacked). ``tokenizer_path`` is a
    folder holding Hugging Face/Meta tokenizer files (``tokenizer.json`` and/or ``tokenizer.model``,
    with ``tokenizer_config.json`` when known) -- for a GGUF file, a temporary folder with files
    rebuilt from the tokenizer stored in the GGUF (removed when the process exits); None when the
    checkpoint has no tokenizer. ``chat_template`` is the Jinja template, when the checkpoint has one.
    """

    params: dict
    model_cfg: ModelConfig
    tokenizer_path: str | None
    chat_template: str | None
    bos_token_id: int | None = None
    eos_token_id: Any = None
    format: str = ""


def load_model(path: str, dtype: Any = None, lora: str | None = None, keep_quantized: bool = False) -> LoadedModel:
    """Read any supported checkpoint into the canonical tree; ``dtype`` (e.g. ``"bfloat16"``) casts on read.
    ``lora``: a LoRA adapter folded into ``path``'s weights (``eval --lora``). ``keep_quantized``
    (inference): a quantized checkpoint or GGUF gives its quantized tree, not float weights."""
    if dtype is not None and not isinstance(dtype, str):
        dtype = np.dtype(dtype).name  # np.float32, jnp.bfloat16 ... -> "float32", "bfloat16"
    if lora is not None:
        from jaxllama.convert.adapters import open_merged

        src = open_merged(lora, path, parse_dtype(dtype))
    else:
        src = open_source(path, dtype)
    params = stacked_params(src, keep_quantized and lora is None)
    ex = src.extras
    tok = ex.tokenizer_dir
    if tok is not None and ex.cleanup:  # a temporary folder (GGUF): keep it for the process's lifetime
        keep_until_exit(list(ex.cleanup))
        ex.cleanup.clear()
    src.close()
    return LoadedModel(params=params, model_cfg=src.model_cfg, tokenizer_path=str(tok) if tok else None,
                       chat_template=ex.chat_template, bos_token_id=ex.bos_token_id, eos_token_id=ex.eos_token_id,
                       format=detect_format(path))


def convert(src_path: str, dst_path: str, to: str, dtype: str | None = None, gguf_type: str | None = None,
            shard_size: int = 5 * 2**30, meta_shards: int = 1, merge_lora: bool = False,
            base: str | None = None, quantize: str | None = None, group_size: int | None = None) -> Path:
    """Convert ``src_path`` (format detected) to ``to`` at ``dst_path``; returns the written path.

    ``dtype`` casts the weights (default: keep the source's); ``gguf_type`` picks the GGUF tensor type
    (default: f32/f16/bf16 from ``dtype`` or the source dtype). Output is written under a temporary name
    and renamed at the end. A LoRA adapter (a LoRA run, a PEFT folder) goes ``--to peft``, or with
    ``merge_lora`` folded into its base (``base``, default the one it records) to any model format.
    ``quantize`` int8/int4 (``--to jaxllama``): store weight-only quantized parameters (what
    ``generate --quantize`` runs), so loading does not quantize again.
    """
    from jaxllama.convert import adapters

    if to not in FORMATS + ADAPTER_FORMATS:
        raise ConfigError(f"--to: {to!r} is not one of {', '.join(FORMATS + ADAPTER_FORMATS)}")
    if gguf_type is not None and to != "gguf":
        raise ConfigError("--gguf-type applies only to --to gguf")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if (quantize not in (None, "none") or group_size is not None) and to != "jaxllama":
        raise ConfigError("--quantize/--group-size apply only to --to jaxllama (for GGUF, use --gguf-type)")
    if quantize not in (None, "none"):
        from jaxllama.model.llama import Arch
        from jaxllama.model.quant import resolve_group

        resolve_group(Arch.from_config(checkpoint_model_config(src_path)), quantize, group_size)  # one-line errors
    if shard_size <= 0:
        raise ConfigError(f"--shard-size: must be positive, got {shard_size}")
    if Path(dst_path).exists():
        raise ConfigError(f"{dst_path}: already exists; remove it or choose another destination")
    lora = adapters.is_adapter(src_path)
    if to == "peft":
        if not lora:
            raise ConfigError(f"--to peft: {src_path} is not a LoRA adapter (train with train.lora.rank > 0)")
        if merge_lora:
            raise ConfigError("--merge-lora writes a whole model: use --to hf, gguf, meta or jaxllama")
        return adapters.write_peft(adapters.read_adapter(src_path), dst_path)
    if lora and not merge_lora:
        raise ConfigError(f"{src_path} is a LoRA adapter: write it with --to peft, or the base with the adapter "
                          f"folded in with --merge-lora --to {to}")
    if merge_lora and not lora:
        raise ConfigError(f"--merge-lora: {src_path} is not a LoRA adapter")
    if base is not None and not merge_lora:
        raise ConfigError("--base applies only to --merge-lora")
    src = adapters.open_merged(src_path, base, parse_dtype(dtype)) if lora else open_source(src_path, dtype)
    return _write(src, dst_path, to, gguf_type, shard_size, meta_shards, quantize, group_size)


def _write(src: Source, dst_path: str, to: str, gguf_type: str | None, shard_size: int, meta_shards: int,
           quantize: str | None = None, group_size: int | None = None) -> Path:
    with src:
        if to == "hf":
            from jaxllama.convert.hf import write_hf

            return write_hf(src, dst_path, shard_size)
        if to == "meta":
            from jaxllama.convert.meta import write_meta

            return write_meta(src, dst_path, meta_shards)
        if to == "gguf":
            from jaxllama.convert.gguf_format import write_gguf

            return write_gguf(src, dst_path, gguf_type)
        from jaxllama.convert.jaxllama_format import write_jaxllama

        return write_jaxllama(src, dst_path, quantize, group_size)
