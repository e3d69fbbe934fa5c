"""What every converter shares: the tensor stream, the one q/k permutation, dtypes, atomic output.

A *source* is a lazily read checkpoint that hands out one canonical tensor at a time
(``source.get("layers/self_attn/q_proj/kernel", layer=3)``): canonical names and layout
(kernels ``[in, out]``, Hugging Face's half-split RoPE layout for q/k), without the stacked
``layers`` axis. Writers pull tensors from a source in the order their format wants, so a
conversion holds about one tensor (or one output shard) in memory, never the whole model.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from jaxllama.config import ModelConfig, resolve_model
from jaxllama.convert.hf_names import LAYER_KERNELS, LAYER_NORMS
from jaxllama.convert.tempdirs import make_owned_dir, sweep_stale
from jaxllama.convert.validate import boolean, positive_int, positive_number
from jaxllama.errors import ConfigError, RunError
from jaxllama.model.llama import Arch, param_shapes
from jaxllama.model.presets import PRESETS

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}

# Canonical names (paths in the Flax tree; per-layer names are under ``layers/``).
EMBED, NORM, HEAD = "embed_tokens/embedding", "norm/scale", "lm_head/kernel"
LAYER_NAMES = [ours for ours, _ in LAYER_KERNELS] + [ours for ours, _ in LAYER_NORMS]
Q, K = "self_attn/q_proj/kernel", "self_attn/k_proj/kernel"

def parse_dtype(name: str | None) -> np.dtype | None:
    """``--dtype`` value -> numpy dtype (bfloat16 via ml_dtypes); None keeps each source tensor's dtype."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"--dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dt: np.dtype) -> str:
    for name, d in DTYPES.items():
        if np.dtype(dt) == d:
            return name
    raise RunError(f"unsupported tensor dtype {dt}")


_INT_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_position",
               "rope_original_max_position")
_NUMBER_FIELDS = ("norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor")


def model_config(where: object = "model description", keys: dict[str, str] | None = None, **fields) -> ModelConfig:
    """A resolved ModelConfig with every architecture field explicit, each checked (type, range, head
    counts) so a hostile file gives one line naming ``where`` and the format's key (``keys`` maps our
    field names to the format's) instead of a traceback deep in the model.

    The preset is the published one whose shape matches (for readability of saved configs), else
    ``debug`` -- irrelevant either way, since no field is left to fill from it.
    """
    keys = keys or {}
    fields = {k: v for k, v in fields.items() if v is not None}
    missing = [keys.get(k, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "norm_eps",
                                        "rope_theta") if k not in fields]
    if missing:
        raise ConfigError(f"{where}: missing key {', '.join(missing)}")
    for k in _INT_FIELDS:
        if k in fields:
            fields[k] = positive_int(fields[k], where, keys.get(k, k))
    for k in _NUMBER_FIELDS:
        if k in fields:
            fields[k] = positive_number(fields[k], where, keys.get(k, k))
    if "tie_embeddings" in fields:
        key = keys.get("tie_embeddings", "tie_embeddings")
        fields["tie_embeddings"] = boolean(fields["tie_embeddings"], where, key)
    heads, dim = fields["n_heads"], fields["dim"]
    fields.setdefault("n_kv_heads", heads)
    if heads % fields["n_kv_heads"]:
        raise ConfigError(f"{where}: {keys.get('n_kv_heads', 'n_kv_heads')}={fields['n_kv_heads']} does not divide "
                          f"{keys.get('n_heads', 'n_heads')}={heads}")
    if "head_dim" not in fields and dim % heads:
        raise ConfigError(f"{where}: {keys.get('dim', 'dim')}={dim} is not a multiple of "
                          f"{keys.get('n_heads', 'n_heads')}={heads} (and no head size is given)")
    fields.setdefault("head_dim", dim // heads)
    if fields["head_dim"] % 2:
        raise ConfigError(f"{where}: head size {fields['head_dim']} is odd (rotary embeddings need an even one)")
    if fields.get("rope_type") == "llama3" and \
            fields.get("rope_high_freq_factor", 4.0) <= fields.get("rope_low_freq_factor", 1.0):
        raise ConfigError(f"{where}: llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                          f"{fields.get('rope_high_freq_factor')} and {fields.get('rope_low_freq_factor')}")
    fields.setdefault("rope_type", "default")
    fields.setdefault("tie_embeddings", False)
    fields.setdefault("max_position", 4096)
    preset = "debug"
    for name, p in PRESETS.items():
        if all(fields.get(k) == v for k, v in p.items() if k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                                    "ffn_dim", "vocab_size")):
            preset = name
            break
    m = ModelConfig(preset=preset, **fields)
    resolve_model(m)
    return m


def permute_qk(w: np.ndarray, n_heads: int, to_interleaved: bool) -> np.ndarray:
    """THE q/k layout change between Hugging Face/jaxllama and Meta/GGUF (llama.cpp).

    Meta's rotary pairs adjacent features (0,1),(2,3)... of each head; Hugging Face (and we) pair
    feature i with i + head_dim/2. ``w`` has the heads*head_dim features on its last axis (our
    ``[in, out]`` kernels, or a Meta/GGUF ``[out, in]`` weight transposed first).
    """
    *lead, feats = w.shape
    hd = feats // n_heads
    if to_interleaved:  # [.., h, 2, hd/2] -> [.., h, hd/2, 2]
        x = w.reshape(*lead, n_heads, 2, hd // 2)
    else:  # [.., h, hd/2, 2] -> [.., h, 2, hd/2]
        x = w.reshape(*lead, n_heads, hd // 2, 2)
    return np.ascontiguousarray(np.swapaxes(x, -1, -2)).reshape(*lead, feats)


def expected_shape(m: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape of one canonical tensor (per layer, without the stacked axis), as the model has it."""
    shapes = param_shapes(Arch.from_config(dataclasses.replace(m, tie_embeddings=False)))
    return shapes[name] if name in shapes else shapes[f"layers/{name}"][1:]


def check_shape(arr: np.ndarray, want: tuple[int, ...], where: str) -> np.ndarray:
    if tuple(arr.shape) != tuple(want):
        raise ConfigError(f"{where}: shape {tuple(arr.shape)} does not match the config's {tuple(want)}")
    return arr


def canonical_names(m: ModelConfig) -> Iterator[tuple[str, int | None]]:
    """(name, layer) of every canonical tensor of ``m``: embed, layer by layer, norm, head."""
    yield EMBED, None
    for i in range(m.n_layers):
        for n in LAYER_NAMES:
            yield n, i
    yield NORM, None
    if not m.tie_embeddings:
        yield HEAD, None


@dataclass
class Extras:
    """Everything beside the weights that a conversion carries over."""

    tokenizer_dir: Path | None = None  # a folder of Hugging Face / Meta tokenizer files
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    generation_config: dict | None = None
    cleanup: list = field(default_factory=list)  # temp dirs to remove on close


class Source:
    """A lazily read checkpoint. Subclasses set ``model_cfg``/``extras`` and implement ``_read``."""

    model_cfg: ModelConfig
    extras: Extras
    dtype: np.dtype | None = None  # None: each tensor as stored (bf16 stays bf16)
    path: Path

    def names(self) -> Iterator[tuple[str, int | None]]:
        """Every canonical tensor in a writer-friendly order: embed, layer by layer, norm, head."""
        return canonical_names(self.model_cfg)

    def get(self, name: str, layer: int | None = None) -> np.ndarray:
        """One canonical tensor, shape-checked, in ``self.dtype`` (or as stored)."""
        arr = np.asarray(self._read(name, layer))
        if tuple(arr.shape) != expected_shape(self.model_cfg, name):
            check_shape(arr, expected_shape(self.model_cfg, name), self.where(name, layer))
        if self.dtype is not None and arr.dtype != self.dtype:
            arr = arr.astype(np.float32).astype(self.dtype) if arr.dtype == BF16 else arr.astype(self.dtype)
        elif arr.dtype not in DTYPES.values():
            arr = arr.astype(np.float32)
        return arr

    def _read(self, name: str, layer: int | None) -> np.ndarray:
        raise NotImplementedError

    def where(self, name: str, layer: int | None) -> str:
        """The file and the format's own tensor name, for error messages."""
        return f"{self.path}: {name}" + (f" (layer {layer})" if layer is not None else "")

    def stored_dtype(self) -> np.dtype:
        """The dtype writers should record (``torch_dtype``, GGUF file type...)."""
        return self.dtype if self.dtype is not None else self.get(NORM).dtype

    def close(self) -> None:
        for d in self.extras.cleanup:
            shutil.rmtree(d, ignore_errors=True)
        self.extras.cleanup.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stacked_params(src: Source, keep_quantized: bool = False) -> dict:
    """The canonical Flax tree (numpy), filled layer by layer into preallocated stacked arrays (quantized
    weights dequantized); ``keep_quantized``: a source stored quantized (a quantized jaxllama dir or
    GGUF: ``src.quantized``) gives its quantized tree (:mod:`jaxllama.model.quant`) instead."""
    if keep_quantized and getattr(src, "quantized", False):
        return src.quantized_tree()
    m = src.model_cfg
    tree: dict = {"embed_tokens": {"embedding": src.get(EMBED)}}
    layers: dict = {}
    for name in LAYER_NAMES:
        first = src.get(name, 0)
        stacked = np.empty((m.n_layers, *first.shape), first.dtype)
        stacked[0] = first
        for i in range(1, m.n_layers):
            stacked[i] = src.get(name, i)
        node = layers
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = stacked
    tree["layers"] = layers
    tree["norm"] = {"scale": src.get(NORM)}
    if not m.tie_embeddings:
        tree["lm_head"] = {"kernel": src.get(HEAD)}
    return tree


TMP_PATTERN = ".*.tmp-*"  # our temporaries beside a destination: .DST.tmp-XXXXXXXX
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def atomic_output(dst: str | Path, is_file: bool = False) -> Iterator[Path]:
    """Yield a path to write (``.DST.tmp-XXXX/DST`` beside ``dst``); rename it to ``dst`` only if the
    block succeeds.

    A failure (or Ctrl-C) removes the temporary, so no half-written DST is ever left behind; a
    process killed outright (SIGKILL) cannot, so each temporary records its owner and the next
    conversion into the same folder removes those whose owner is gone (:mod:`.tempdirs`). An
    existing DST is refused rather than overwritten; an unwritable one is one line naming it.
    """
    dst = Path(dst)
    if dst.exists():
        raise ConfigError(f"{dst}: already exists; remove it or choose another destination")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{dst}: {parent} " + ("is a file, not a folder" if parent.exists() else "does not exist"))
    sweep_stale(parent, TMP_PATTERN)
    try:
        tmp = make_owned_dir(f".{dst.name}.tmp-", parent)
    except OSError as e:
        raise ConfigError(f"{dst}: cannot write in {parent} ({e.strerror or e})") from None
    target = tmp / dst.name
    try:
        if not is_file:
            target.mkdir()
        yield target
        os.replace(target, dst)
    except OSError as e:
        names = [str(n) for n in (e.filename, e.filename2) if n is not None]
        ours = any(n.startswith(str(tmp)) or n == str(dst) for n in names)
        if ours or (not names and e.errno in _WRITE_ERRNOS):
            raise RunError(f"{dst}: cannot write ({e.strerror or e})") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer_files(src_dir: Path | None, dst: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the tokenizer files that exist in ``src_dir`` (by name) into ``dst``; returns what was copied."""
    copied = []
    if src_dir is None:
        return copied
    for n in names:
        if (src_dir / n).is_file():
            shutil.copyfile(src_dir / n, dst / n)
            copied.append(n)
    return copied


def keep_until_exit(dirs: list) -> None:
    """Remove temporary folders (e.g. a tokenizer rebuilt from a GGUF) when the process exits."""
    for d in dirs:
        atexit.register(shutil.rmtree, d, True)


class ParamsSource(Source):
    """An in-memory canonical tree as a source (to export freshly trained or random parameters)."""

    def __init__(self, params: dict, model_cfg: ModelConfig, extras: Extras | None = None,
                 dtype: np.dtype | None = None):
        self.params, self.model_cfg, self.dtype = params, model_cfg, dtype
        self.extras = extras or Extras()
        self.path = Path("<params>")

    def _read(self, name: str, layer: int | None) -> np.ndarray:
        node = self.params if layer is None else self.params["layers"]
        for part in name.split("/"):
            node = node[part]
        return np.asarray(node if layer is None else node[layer])
