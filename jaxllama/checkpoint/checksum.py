"""Checksums of stored arrays, so a checkpoint damaged in place (same size, flipped bytes) is caught on read.

Orbax and TensorStore detect a missing or truncated file, but not bytes changed in place: such a
checkpoint restores "fine" and trains on garbage. So every save records, per array, a hash of its
bit pattern, and every read (resume, ``load_params``, the lazy reader ``convert`` uses) recomputes
and compares it.

The hash must not depend on how the array is sharded or read, since a run may resume on another
mesh and ``convert`` reads one layer at a time: it is a sum, modulo 2**32, of a per-element mix of
(bits, flat index), so shards and slices add up to the same value in any order, on device (jitted,
one pass over memory) or in numpy. Two different mixes give 64 bits. Arrays under ``layers`` (the
stacked blocks, leading axis = layer) get one pair per layer, so reading layer i checks layer i.
Any change to one element changes its mix (each step of the mix is a bijection), so it is always
detected; changes to several elements escape with probability about 2**-64.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.errors import RunError

# Odd multipliers (bijective mod 2**32), from the murmur3 / xxhash finalizers.
_MIX = ((0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D), (0x27D4EB2F, 0x165667B1, 0xD3A2646C | 1))


class ChecksumError(RunError):
    """Stored bytes differ from what was saved: the checkpoint is damaged (callers fall back)."""


def leaf_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def per_layer(name: str, ndim: int) -> bool:
    """Stacked block arrays (a ``layers`` key in the path, leading axis = layer) are checked per layer."""
    return ndim >= 1 and "layers" in name.split("/")


def _mix(bits: Any, index: Any, xp: Any) -> list[Any]:
    out = []
    for a, b, c in _MIX:
        h = (bits ^ (index * xp.uint32(a))) * xp.uint32(b)
        h = (h ^ (h >> xp.uint32(15))) * xp.uint32(c)
        out.append(h ^ (h >> xp.uint32(13)))
    return out


def _bits_np(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(x.dtype.itemsize)
    if width is None:  # 8-byte values: both halves count
        return x.view(np.uint32)
    return x.view(width).astype(np.uint32)


def _bits_jnp(x: jax.Array) -> jax.Array:
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def sums_np(x: np.ndarray) -> list[list[int]]:
    """``[[h1, h2]]`` for a whole array (``x`` as stored; the flat index runs over it)."""
    bits = _bits_np(np.asarray(x)).reshape(-1)
    index = np.arange(bits.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        return [[int(np.sum(h, dtype=np.uint32)) for h in _mix(bits, index, np)]]


def _sums_jnp(x: jax.Array, layered: bool) -> jax.Array:
    """uint32 ``[layers or 1, 2]``: per leading slice when ``layered``, else over the whole array."""
    bits = _bits_jnp(x)
    if not layered:
        bits = bits.reshape(1, -1)
    bits = bits.reshape(bits.shape[0], -1)
    index = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, 1)
    return jnp.stack([jnp.sum(h, axis=1, dtype=jnp.uint32) for h in _mix(bits, index, jnp)], axis=1)


@functools.lru_cache(maxsize=16)
def _jitted(layered: tuple[bool, ...], mesh: Any) -> Any:
    """One jitted function per tree layout (and mesh), so each save reuses the compiled hash instead of
    tracing a new closure; on a mesh the results are replicated, so every process can read them."""
    def fn(leaves):
        return [_sums_jnp(x, lay) for x, lay in zip(leaves, layered)]

    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def tree_checksums(tree: Any) -> dict[str, list[list[int]]]:
    """``{leaf name: [[h1, h2], ...]}`` (one pair per layer for stacked arrays), computed where the arrays live."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    names = [leaf_name(p) for p, _ in flat]
    layered = [per_layer(n, np.ndim(x)) for n, (_, x) in zip(names, flat)]
    leaves = [x for _, x in flat]
    sharding = getattr(leaves[0], "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
    out = _jitted(tuple(layered), mesh)(leaves)
    return {n: np.asarray(jax.device_get(v)).astype(np.int64).tolist() for n, v in zip(names, out)}


def verify_tree(tree: Any, recorded: dict[str, list] | None, where: str) -> None:
    """Raise :class:`ChecksumError` naming the first array whose checksum differs (``recorded`` None: an
    older checkpoint without checksums, nothing to check)."""
    if not recorded:
        return
    now = tree_checksums(tree)
    for name, sums in now.items():
        want = recorded.get(name)
        if want is not None and want != sums:
            bad = next(i for i, (a, b) in enumerate(zip(sums, want)) if a != b) if len(sums) == len(want) else 0
            layer = f" (layer {bad})" if len(sums) > 1 else ""
            raise ChecksumError(f"{where}: {name}{layer} does not match the checksum recorded at save "
                                "(the stored bytes changed)")


def verify_slice(x: np.ndarray, recorded: list | None, where: str) -> None:
    """Check a numpy read of a whole array or of one layer against its recorded ``[h1, h2]``."""
    if recorded is not None and sums_np(x)[0] != list(recorded):
        raise ChecksumError(f"{where} does not match the checksum recorded at save (the stored bytes changed)")
