"""Weight-only quantization: int8 and int4 values with float32 scales per group of input rows.

The one owner of the quantized layout; everything else (the model's layers, QLoRA's frozen base,
inference, the converters, GGUF import) asks this module.

A float kernel ``[..., in, out]`` becomes

- ``kernel_q``: ``[..., out, in]`` int8 (mode ``int8``, values in [-127, 127]), or ``[..., out, in / 2]``
  uint8 (mode ``int4``: two values per byte, stored as ``q + 8`` in [0, 15]; within each group of
  ``g`` inputs, byte ``j`` holds input ``j`` in its low nibble and input ``j + g/2`` in its high one);
- ``kernel_scale``: ``[..., out, in / g]`` float32, so ``w[i, o] ~= q[o, i] * scale[o, i // g]``.

Output-major, as llama.cpp stores its blocks: each output's weights are contiguous, which is what a
matrix-vector product (batch-1 decoding) reads, and a GGUF Q8_0 / Q4_0 / Q6_K tensor maps onto it
block for block. ``group`` 0 means one group of all inputs (int8's default: per output channel).
Symmetric absmax scales, round to nearest.

The embedding table ``[vocab, dim]`` is already output-major for a tied LM head, so it quantizes the
same way with ``embed`` in the role of ``in`` (``embedding_q`` / ``embedding_scale``); a token's row
is dequantized when it is looked up.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MODES = ("none", "int8", "int4")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_GROUP = {"int8": 0, "int4": 128}
_QMAX = {"int8": 127, "int4": 7}
QDTYPE = {"int8": jnp.int8, "int4": jnp.uint8}
STORED_AS_IS = ("kernel_q", "kernel_scale", "embedding_q", "embedding_scale")  # never cast to a compute dtype


KV_DTYPES = ("auto", "int8")  # --kv-cache-dtype: auto (the compute dtype) or int8 with a scale per token and head


def check_kv_dtype(name: str, where: str = "--kv-cache-dtype") -> None:
    if name not in KV_DTYPES:
        from jaxllama.errors import ConfigError

        raise ConfigError(f"{where}: {name!r} is not one of {', '.join(KV_DTYPES)}")


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys or values [..., head_dim] -> int8 values and a float32 scale [..., 1] per token and head
    (symmetric, max |x| -> 127; an all-zero vector gets scale 1). The int8 KV cache stores these."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8), scale


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    return (q.astype(jnp.float32) * scale).astype(dtype)


def group_size(mode: str, group: int, d_in: int) -> int:
    """The number of inputs per scale: ``group``, or all of them for 0."""
    return d_in if group == 0 else group


def q_shape(mode: str, d_in: int, d_out: int) -> tuple[int, int]:
    return (d_out, d_in // 2) if mode == "int4" else (d_out, d_in)


def scale_shape(mode: str, group: int, d_in: int, d_out: int) -> tuple[int, int]:
    return d_out, d_in // group_size(mode, group, d_in)


def check_group(d_in: int, group: int, where: str, mode: str = "int4") -> None:
    """A one-line error when ``group`` cannot split ``d_in`` inputs (int4 also needs an even group)."""
    from jaxllama.errors import ConfigError

    if group == 0:
        return
    if group < 0 or d_in % group or (mode == "int4" and group % 2):
        raise ConfigError(f"{where}: the {mode} group size {group} must divide the projections' input size "
                          f"{d_in}{' and be even' if mode == 'int4' else ''}")


def check_mode(mode: str, where: str) -> None:
    from jaxllama.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"{where}: {mode!r} is not one of {', '.join(MODES)}")


def resolve_group(a: Any, mode: str, group: int | None) -> int:
    """The group size ``--quantize mode --group-size group`` means for the model ``a`` (an Arch), with a
    one-line error for a mode or group its shapes cannot take."""
    from jaxllama.errors import ConfigError

    check_mode(mode, "--quantize")
    if mode == "none":
        return 0
    group = DEFAULT_GROUP[mode] if group is None else group
    if group == 0 and mode == "int4":
        raise ConfigError("--group-size 0 (one scale per output) is int8's; int4 needs groups (e.g. 32, 64, 128)")
    for d_in in sorted({a.dim, a.n_heads * a.head_dim, a.ffn_dim}):
        check_group(d_in, group, "--group-size", mode)
    return group


def quantize_rows(w: jax.Array, mode: str, group: int) -> tuple[jax.Array, jax.Array]:
    """(q, scale) of an output-major float matrix ``[..., out, in]``."""
    w = jnp.asarray(w, jnp.float32)
    *lead, d_out, d_in = w.shape
    g = group_size(mode, group, d_in)
    blocks = w.reshape(*lead, d_out, d_in // g, g)
    qmax = _QMAX[mode]
    scale = jnp.max(jnp.abs(blocks), axis=-1) / qmax
    q = jnp.round(blocks / jnp.where(scale == 0, 1, scale)[..., None])
    if mode == "int8":
        return jnp.clip(q, -qmax, qmax).astype(jnp.int8).reshape(w.shape), scale
    u = (jnp.clip(q, -qmax - 1, qmax) + 8).astype(jnp.uint8)
    packed = u[..., : g // 2] | (u[..., g // 2:] << 4)
    return packed.reshape(*lead, d_out, d_in // 2), scale


def unpack(q: jax.Array, mode: str, groups: int) -> jax.Array:
    """The int8 values ``[..., out, in]`` of ``kernel_q`` (int4: unpacked from its nibbles)."""
    if mode == "int8":
        return q
    *lead, d_out, half = q.shape
    p = q.reshape(*lead, d_out, groups, half // groups)
    lo = (p & 15).astype(jnp.int8) - 8
    hi = (p >> 4).astype(jnp.int8) - 8
    return jnp.concatenate([lo, hi], axis=-1).reshape(*lead, d_out, 2 * half)


def dequantize_rows(q: jax.Array, scale: jax.Array, mode: str, dtype: Any = jnp.float32) -> jax.Array:
    """The output-major float matrix ``[..., out, in]`` that (q, scale) stands for."""
    groups = scale.shape[-1]
    v = unpack(q, mode, groups)
    *lead, d_out, d_in = v.shape
    w = v.astype(dtype).reshape(*lead, d_out, groups, d_in // groups) * scale.astype(dtype)[..., None]
    return w.reshape(v.shape)


def quantize(w: jax.Array, mode: str, group: int) -> tuple[jax.Array, jax.Array]:
    """(kernel_q, kernel_scale) of a float kernel ``[..., in, out]``."""
    return quantize_rows(jnp.swapaxes(jnp.asarray(w), -1, -2), mode, group)


def dequantize(q: jax.Array, scale: jax.Array, mode: str, dtype: Any = jnp.float32) -> jax.Array:
    """The float kernel ``[..., in, out]`` that (kernel_q, kernel_scale) stands for."""
    return jnp.swapaxes(dequantize_rows(q, scale, mode, dtype), -1, -2)


def mode_of(q: jax.Array) -> str:
    """A quantized array's mode, from its dtype (a GGUF file may mix them tensor by tensor)."""
    return "int4" if q.dtype == jnp.uint8 else "int8"


def matmul(x: jax.Array, q: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    """``x @ dequantize(q, scale)`` for ``x [..., in]``; the mode and group size are read off the
    arrays (``q``'s dtype, ``scale``'s width).

    One scale per output (int8's default) is applied to the output of an integer-valued matmul, so
    only the convert of ``q`` feeds the matmul (GPU and TPU fuse it into the matmul's operand load);
    grouped scales dequantize one layer's kernel. On CPU, a few rows (decoding) go to the native
    kernel (:mod:`jaxllama.model.cpu_kernels`), which reads the quantized bytes directly: XLA:CPU
    neither fuses the convert into its matmul nor reaches memory bandwidth with a fused reduction.
    """
    from jaxllama.model import cpu_kernels

    mode = mode_of(q)
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if cpu_kernels.wanted(rows, dtype):
        return cpu_kernels.qmatmul(x, q, scale, mode)
    contract = (((x.ndim - 1,), (1,)), ((), ()))
    if scale.shape[-1] == 1:
        v = unpack(q, mode, 1).astype(dtype)
        return jax.lax.dot_general(x.astype(dtype), v, contract) * scale[:, 0].astype(dtype)
    return jax.lax.dot_general(x.astype(dtype), dequantize_rows(q, scale, mode, dtype), contract)


def embed_rows(q: jax.Array, scale: jax.Array, tokens: jax.Array, dtype: Any) -> jax.Array:
    """Rows ``tokens`` of a quantized embedding table, dequantized: ``[..., dim]``."""
    return dequantize_rows(jnp.take(q, tokens, axis=0), jnp.take(scale, tokens, axis=0), mode_of(q), dtype)


def param(module: Any, name: str, axes: tuple, shape: tuple, dtype: Any, ones: bool = False) -> jax.Array:
    """A quantized parameter of a Flax module: the stored one as it is when there is one (its mode and
    group may differ from the arch's, tensor by tensor, as in a llama.cpp mixture), else declared with
    the arch's shape and logical axes (initialization, abstract shapes, shardings)."""
    import flax.linen as nn

    if module.has_variable("params", name):
        return module.get_variable("params", name)
    init = nn.initializers.ones if ones else nn.initializers.zeros
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def head_format(mode: str, group: int) -> tuple[str, int]:
    """The embedding's and LM head's (mode, group): int4 keeps them int8 per output channel, as llama.cpp
    keeps its output matrix at 6 bits (measured on the trained model, benchmarks/quant_quality.py: an int4
    head had 4.7x the KL divergence of llama.cpp's Q4_0; the blocks alone at int4, below Q4_0's)."""
    return ("int8", 0) if mode == "int4" else (mode, group)


def quantize_tree(tree: dict, mode: str, group: int, embedding: bool = False) -> dict:
    """Every block projection's ``kernel`` in ``tree`` -> ``kernel_q`` and ``kernel_scale`` (jit-able).
    ``embedding``: also the embedding table and an untied LM head (inference; QLoRA keeps them float)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and "kernel" in v and (k in BLOCK_LINEARS or (embedding and k == "lm_head")):
            q, s = quantize(v["kernel"], *((mode, group) if k != "lm_head" else head_format(mode, group)))
            out[k] = {**{n: x for n, x in v.items() if n != "kernel"}, "kernel_q": q, "kernel_scale": s}
        elif isinstance(v, dict) and embedding and k == "embed_tokens" and "embedding" in v:
            q, s = quantize_rows(v["embedding"], *head_format(mode, group))
            out[k] = {"embedding_q": q, "embedding_scale": s}
        elif isinstance(v, dict):
            out[k] = quantize_tree(v, mode, group, embedding)
        else:
            out[k] = v
    return out


def detect(tree: dict) -> tuple[str, int] | None:
    """(mode, group size) of a quantized parameter tree (group 0: one scale per output), else None."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if getattr(path[-1], "key", None) == "kernel_q":
            scale = _sibling(tree, path, "kernel_scale")
            mode = "int4" if leaf.dtype == np.uint8 else "int8"
            d_in = leaf.shape[-1] * (2 if mode == "int4" else 1)
            groups = scale.shape[-1]
            return mode, 0 if groups == 1 and mode == "int8" else d_in // groups
    return None


def _sibling(tree: dict, path, name: str):
    node = tree
    for p in path[:-1]:
        node = node[p.key]
    return node[name]


def _transposed(x: Any) -> Any:
    """A sharding or abstract value of ``kernel_q`` [.., out, in] -> that of its float kernel [.., in, out]."""
    if isinstance(x, NamedSharding):
        spec = list(x.spec) + [None] * (len(x.spec) < 2) * (2 - len(x.spec))
        return NamedSharding(x.mesh, PartitionSpec(*spec[:-2], spec[-1], spec[-2]))
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = _transposed(x.sharding) if isinstance(x.sharding, NamedSharding) else None
        d_in = x.shape[-1] * (2 if x.dtype == jnp.uint8 else 1)
        return jax.ShapeDtypeStruct((*x.shape[:-2], d_in, x.shape[-2]), jnp.float32, sharding=sh)
    return x


def float_shardings(tree: dict) -> dict:
    """Shardings (or abstract values) of the float tree a quantized tree is made from: each
    ``kernel_q``'s, transposed, stands for its ``kernel`` (the same logical axes)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and "kernel_q" in v:
            out[k] = {**{n: x for n, x in v.items() if n not in ("kernel_q", "kernel_scale")},
                      "kernel": _transposed(v["kernel_q"])}
        elif isinstance(v, dict) and "embedding_q" in v:
            out[k] = {"embedding": v["embedding_q"]}
        elif isinstance(v, dict):
            out[k] = float_shardings(v)
        else:
            out[k] = v
    return out
