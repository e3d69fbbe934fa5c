"""Weight-only quantization of the block projections: int8 per output channel, int4 per group of
input rows. QLoRA holds its frozen base this way (the adapters stay float32).

A quantized kernel ``[..., in, out]`` becomes ``kernel_q`` (int8 values, or int4 values in [-8, 7]) and
``kernel_scale``: ``[..., out]`` for int8 (``w ~= q * scale``), ``[..., in / group, out]`` for int4
(``w[i] ~= q[i] * scale[i // group]``). Symmetric absmax scales, round to nearest. The model
dequantizes inside the matmul (:func:`dequantized_matmul`): per-channel scales apply to the output, so
the int8 kernel is never expanded to float beyond one layer's transient copy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

MODES = ("none", "int8", "int4")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_QMAX = {"int8": 127, "int4": 7}
# int4 values are stored one per byte: arrays of XLA's packed S4 type made by one jitted function do not
# match the layout another compiled function expects (CPU, JAX 0.10), so packing waits for the
# quantized-inference kernels; the grouped scales and the 16 levels are int4's.
QDTYPE = {"int8": jnp.int8, "int4": jnp.int8}


def quantize(w: jax.Array, mode: str, group: int) -> tuple[jax.Array, jax.Array]:
    """(q, scale) of a float kernel ``[..., in, out]``."""
    w = jnp.asarray(w, jnp.float32)
    qmax = _QMAX[mode]
    if mode == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2) / qmax
        q = jnp.round(w / jnp.where(scale == 0, 1, scale)[..., None, :])
        return jnp.clip(q, -qmax, qmax).astype(QDTYPE[mode]), scale
    *lead, d_in, d_out = w.shape
    g = w.reshape(*lead, d_in // group, group, d_out)
    scale = jnp.max(jnp.abs(g), axis=-2) / qmax
    q = jnp.round(g / jnp.where(scale == 0, 1, scale)[..., None, :])
    return jnp.clip(q, -qmax - 1, qmax).astype(QDTYPE[mode]).reshape(w.shape), scale


def dequantize(q: jax.Array, scale: jax.Array, mode: str, dtype: Any = jnp.float32) -> jax.Array:
    if mode == "int8":
        return q.astype(dtype) * scale.astype(dtype)[..., None, :]
    *lead, d_in, d_out = q.shape
    groups = scale.shape[-2]
    w = q.astype(dtype).reshape(*lead, groups, d_in // groups, d_out) * scale.astype(dtype)[..., None, :]
    return w.reshape(q.shape)


def dequantized_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, mode: str, dtype: Any) -> jax.Array:
    """``x @ dequantize(q, scale)``: int8 scales the output columns after an integer-valued matmul."""
    if mode == "int8":
        return jnp.dot(x.astype(dtype), q.astype(dtype)) * scale.astype(dtype)
    return jnp.dot(x.astype(dtype), dequantize(q, scale, mode, dtype))


def check_group(d_in: int, group: int, where: str) -> None:
    from jaxllama.errors import ConfigError

    if group <= 0 or d_in % group:
        raise ConfigError(f"{where}: the int4 group size {group} must divide the projections' input size {d_in}")


def quantize_tree(tree: dict, mode: str, group: int) -> dict:
    """Every block projection's ``kernel`` in ``tree`` -> ``kernel_q`` and ``kernel_scale`` (jit-able)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k in BLOCK_LINEARS and "kernel" in v:
            q, s = quantize(v["kernel"], mode, group)
            out[k] = {**{n: x for n, x in v.items() if n != "kernel"}, "kernel_q": q, "kernel_scale": s}
        elif isinstance(v, dict):
            out[k] = quantize_tree(v, mode, group)
        else:
            out[k] = v
    return out


def float_shardings(tree: dict) -> dict:
    """Shardings (or abstract values) of the float tree a quantized tree is made from: each
    ``kernel_q``'s stands for its ``kernel`` (the same logical axes)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and "kernel_q" in v:
            out[k] = {**{n: x for n, x in v.items() if n not in ("kernel_q", "kernel_scale")}, "kernel": v["kernel_q"]}
        elif isinstance(v, dict):
            out[k] = float_shardings(v)
        else:
            out[k] = v
    return out
