"""A quantized GGUF file's weights as jaxllama's quantized tree (:mod:`jaxllama.model.quant`), not as f32.

Where llama.cpp's block format is ours, the bytes carry over exactly:

- ``Q8_0`` (32 int8 values, one f16 scale): int8, group 32;
- ``Q4_0`` (32 4-bit values stored ``q + 8``, byte ``j`` holding values ``j`` and ``j + 16``, one
  f16 scale): int4, group 32 -- byte for byte our packing;
- ``Q5_0`` (values in [-16, 15]): int8, group 32;
- ``Q6_K`` (256-value super-blocks of 16 groups, 6-bit values in [-32, 31], an int8 scale per group
  times an f16 super-scale): int8, group 16.

Types with a per-group offset (``Q4_1``, ``Q5_1``, ``Q4_K``, ``Q5_K``...) or below 4 bits have no
symmetric equivalent: they are dequantized and re-quantized to int8 with groups of 32, which keeps
their accuracy (int8's error is far below theirs) at int8's size. A float 2-D weight in a quantized
file (llama.cpp keeps some, e.g. rows that are not whole blocks) becomes int8 per output channel.

Layers of one tensor name may differ in type (llama.cpp's Q4_K_M puts some ``attn_v``/``ffn_down``
in Q6_K): they are stacked at the finest of their formats (int4 unpacked to int8, scales repeated to
the smallest group), which is exact.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from jaxllama.model import quant

EXACT = ("Q8_0", "Q4_0", "Q5_0", "Q6_K")
FLOAT = ("F32", "F16", "BF16")
REQUANT_GROUP = 32


def is_quantized(type_names: list[str]) -> bool:
    """Whether a file's 2-D weights are quantized (then it loads as a quantized tree)."""
    return any(t not in FLOAT for t in type_names)


def rows_of(raw: np.ndarray, qtype_name: str, d_in: int, dequantize: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) in our output-major layout for one tensor's raw blocks ``[out, bytes per row]``."""
    out = raw.shape[0]
    if qtype_name == "Q8_0":
        b = raw.reshape(out, d_in // 32, 34)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        return b[..., 2:].copy().view(np.int8).reshape(out, d_in), d
    if qtype_name == "Q4_0":
        b = raw.reshape(out, d_in // 32, 18)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        return np.ascontiguousarray(b[..., 2:]).reshape(out, d_in // 2), d
    if qtype_name == "Q5_0":
        b = raw.reshape(out, d_in // 32, 22)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qh = b[..., 2:6].copy().view(np.uint32)[..., 0]  # bit i: the fifth bit of value i
        ql = b[..., 6:]
        lo = np.concatenate([ql & 15, ql >> 4], axis=-1)  # values 0..15 then 16..31
        hi = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        return ((lo | (hi << 4)).astype(np.int8) - 16).reshape(out, d_in), d
    if qtype_name == "Q6_K":
        b = raw.reshape(out, d_in // 256, 210)
        ql, qh, sc = b[..., :128], b[..., 128:192], b[..., 192:208].copy().view(np.int8)
        d = b[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)
        # 2 halves of 128 values; in each, 4 runs of 32: low nibbles of ql[0:32], of ql[32:64], high
        # nibbles of ql[0:32], of ql[32:64]; qh's bit pairs 0, 2, 4, 6 are their top two bits.
        ql = ql.reshape(out, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        ql = (ql & 15).reshape(out, -1, 2, 4, 32)
        qh = qh.reshape(out, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        qh = (qh & 3).reshape(out, -1, 2, 4, 32)
        q = ((ql | (qh << 4)).astype(np.int8) - 32).reshape(out, d_in)
        return q, (d[..., None] * sc.astype(np.float32)).reshape(out, d_in // 16)
    w = np.asarray(dequantize(raw), np.float32).reshape(out, d_in)
    group = REQUANT_GROUP if d_in % REQUANT_GROUP == 0 else 0
    q, s = quant.quantize_rows(w, "int8", group)
    return np.asarray(q), np.asarray(s)


def float_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float ``[out, in]`` weight kept in a quantized file: int8 per output channel."""
    q, s = quant.quantize_rows(np.asarray(w, np.float32), "int8", 0)
    return np.asarray(q), np.asarray(s)


def stack(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Layers' (q, scale) of one name -> stacked arrays, at the finest format among them (exact)."""
    if all(p[0].dtype == parts[0][0].dtype and p[1].shape == parts[0][1].shape for p in parts):
        return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    groups = max(p[1].shape[-1] for p in parts)
    qs, ss = [], []
    for q, s in parts:
        v = np.asarray(quant.unpack(q, quant.mode_of(q), s.shape[-1])) if q.dtype == np.uint8 else q
        qs.append(v.astype(np.int8))
        ss.append(np.repeat(s, groups // s.shape[-1], axis=-1))
    return np.stack(qs), np.stack(ss)


def tree_of(read: Callable[[str, Any], tuple[np.ndarray, np.ndarray] | np.ndarray], names: list,
            n_layers: int) -> dict:
    """The nested quantized tree from ``read(name, layer)``: (q, scale) for weights, arrays for norms."""
    tree: dict = {}
    per_name: dict[str, list] = {}
    for name, layer in names:
        value = read(name, layer)
        if layer is None:
            _put(tree, name, value)
        else:
            per_name.setdefault(name, []).append(value)
    for name, values in per_name.items():
        if isinstance(values[0], tuple):
            _put(tree, "layers/" + name, stack(values))
        else:
            _put(tree, "layers/" + name, np.stack(values))
    return tree


def _put(tree: dict, name: str, value) -> None:
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    if isinstance(value, tuple):
        node[f"{leaf}_q"], node[f"{leaf}_scale"] = value
    else:
        node[leaf] = value
