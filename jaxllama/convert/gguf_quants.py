"""Q4_K and Q6_K encoders in numpy, the way llama.cpp's reference quantizers make them.

The ``gguf`` package dequantizes K-quants but cannot make them. These follow llama.cpp's
``quantize_row_q4_K_ref`` (per 32-value sub-block a scale and a min searched by
``make_qkx2_quants``: weighted least squares over 21 trial scales) and ``quantize_row_q6_K_ref``
(per 16-value sub-block a signed scale searched by ``make_qx_quants``: 19 trial scales, x²-weighted),
then the 6/8-bit super-block scales, the requantization and the bit packing, vectorized over all
blocks of a tensor at once (the only Python loops are over trial scales and over the 16/32 values
of a sub-block). Arithmetic is float32 in llama.cpp's order (levels are float32 too, so nothing is
promoted to float64; sums accumulate left to right; ties round to even as its ``nearest_int`` does),
and the blocks come out bit-identical to llama.cpp's (every block of the tests' models and edge rows).

Byte layouts (GGUF's, little-endian), one block per 256 values of a row:
  Q4_K (144 bytes): d f16, dmin f16, scales[12] (8 six-bit scales and 8 six-bit mins), qs[128] (4-bit)
  Q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d f16
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_CHUNK = 1 << 14  # super-blocks encoded per step (bounds the temporaries to a few tens of MB)
_EPS = np.float32(1e-15)  # llama.cpp's GROUP_MAX_EPS: a sub-block with |x| below this is all zeros
F32 = np.float32


def _rint(a: np.ndarray) -> np.ndarray:
    return np.rint(a, out=a)  # round half to even, as llama.cpp's nearest_int (levels stay float32: exact)


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over the first axis (the values of a sub-block; blocks run along the last, contiguous axis), left
    to right in float32 as llama.cpp's loops accumulate (numpy's own sum is pairwise)."""
    s = a[0].copy()
    for row in a[1:]:
        s += row
    return s


def _f16(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the float16 llama.cpp stores (round to nearest even), that value back in float32 as its later steps read it)."""
    h = a.astype(np.float16)
    return h, h.astype(F32)


def _rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, F32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"{name}: rows of {x.shape[-1]} values are not whole {QK_K}-value blocks")
    return x.reshape(-1, QK_K)


def _encode(x: np.ndarray, block_fn, nbytes: int, name: str) -> np.ndarray:
    blocks = _rows(x, name)
    out = np.empty((blocks.shape[0], nbytes), np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(0, blocks.shape[0], _CHUNK):
            out[i:i + _CHUNK] = block_fn(blocks[i:i + _CHUNK])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * nbytes)


# ---- Q4_K ------------------------------------------------------------------------------------------------


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's ``make_qkx2_quants`` (squared error) on each column of ``x`` [k, n] (n sub-blocks of k
    values) with weights ``w``: returns (scale, min, levels) with x ≈ scale·L - min, L in 0..nmax."""
    mn, mx = x.min(0), x.max(0)
    sum_w, sum_x = _sum(w), _sum(w * x)
    mn = np.minimum(mn, F32(0))
    flat = mx == mn
    nmax32 = F32(nmax)
    iscale = nmax32 / np.where(flat, F32(1), mx - mn)
    scale = F32(1) / iscale
    L = np.clip(_rint(iscale * (x - mn)), 0, nmax)
    diff = scale * L + mn - x
    best = _sum(w * (diff * diff))
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax32) / (mx - mn)  # min as improved so far
        La = np.clip(_rint(iscale * (x - mn)), 0, nmax)
        wl = w * La
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * La), _sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        diff = this_scale * La + this_min - x
        err = _sum(w * (diff * diff))
        better = (D > 0) & (err < best) & ~flat
        L = np.where(better, La, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat, 0, L)
    return np.where(flat, F32(0), scale), -mn, L


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(n * 8, 32).T)  # [32, sub-blocks]
    av_x = np.sqrt(_sum(xs * xs) / F32(32))
    w = av_x + np.abs(xs)
    scales, mins, L = _qkx2(xs, w, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.T.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(-1), F32(0))
    max_min = np.maximum(mins.max(-1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # uint8 as in C (a negative rounds to 256 - k, then capped at 63)
    ls = np.minimum(_rint(inv_scale[:, None] * scales).astype(np.int32) & 0xFF, 63)
    lm = np.minimum(_rint(inv_min[:, None] * mins).astype(np.int32) & 0xFF, 63)
    d16, d = _f16(max_scale / F32(63))
    dmin16, dmin = _f16(max_min / F32(63))
    # requantize against the stored (f16 x 6-bit) scale and min; a zero scale keeps the search's levels
    dsub = d[:, None] * ls.astype(F32)
    msub = dmin[:, None] * lm.astype(F32)
    Lq = np.clip(_rint((x.reshape(n, 8, 32) + msub[..., None]) / dsub[..., None]), 0, 15)
    L = np.where((dsub != 0)[..., None], Lq, L).astype(np.uint8)
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    sc = np.empty((n, 12), np.uint8)
    sc[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    L = L.reshape(n, 4, 2, 32)  # 64 values per 32 bytes: low nibble the first 32, high nibble the next 32
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d16.reshape(n, 1).view(np.uint8), dmin16.reshape(n, 1).view(np.uint8), sc, qs], axis=1)


def quantize_q4_k(x: np.ndarray, name: str = "tensor") -> np.ndarray:
    """Rows of ``x`` (length a multiple of 256) as Q4_K bytes: shape [..., row_len / 256 * 144] uint8."""
    return _encode(x, _q4_k_blocks, 144, name)


# ---- Q6_K ------------------------------------------------------------------------------------------------


def _qx(x: np.ndarray, nmax: int):
    """llama.cpp's ``make_qx_quants`` with rmse_type 1 and no importance weights (weights x²) on each column
    of ``x`` [k, n]: returns (scale, levels) with x ≈ scale·(L - nmax), L in 0..2·nmax-1."""
    ax = np.abs(x)
    amax = ax.max(0)
    big = np.take_along_axis(x, ax.argmax(0)[None], 0)[0]  # the first value of largest magnitude
    zero = amax < _EPS
    big = np.where(zero, F32(1), big)
    w = x * x
    wx = w * x

    def trial(iscale):
        l = np.clip(_rint(iscale * x), -nmax, nmax - 1)
        return l, _sum(wx * l), _sum((w * l) * l)

    l, sumlx, suml2 = trial(-F32(nmax) / big)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    L = l + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / big)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, l + nmax, L)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    scales, L = _qx(np.ascontiguousarray(x.reshape(n * 16, 16).T), 32)  # [16, sub-blocks]
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)
    ab = np.abs(scales)
    max_abs = ab.max(-1)
    max_scale = np.take_along_axis(scales, ab.argmax(-1)[:, None], -1)[:, 0]
    empty = max_abs < _EPS  # an all-zero super-block: every byte 0
    max_scale = np.where(empty, F32(1), max_scale)
    iscale = F32(-128) / max_scale
    d16, d = _f16(F32(1) / iscale)
    sc = np.minimum(_rint(iscale[:, None] * scales), 127)
    dsub = d[:, None] * sc.astype(F32)
    Lq = np.clip(_rint(x.reshape(n, 16, 16) / dsub[..., None]), -32, 31) + 32
    L = np.where((dsub != 0)[..., None], Lq, L).astype(np.uint8).reshape(n, 2, 4, 32)  # per half: 4 x 32
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(n, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    out = np.concatenate([ql, qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8),
                          d16.reshape(n, 1).view(np.uint8)], axis=1)
    out[empty] = 0
    return out


def quantize_q6_k(x: np.ndarray, name: str = "tensor") -> np.ndarray:
    """Rows of ``x`` (length a multiple of 256) as Q6_K bytes: shape [..., row_len / 256 * 210] uint8."""
    return _encode(x, _q6_k_blocks, 210, name)
