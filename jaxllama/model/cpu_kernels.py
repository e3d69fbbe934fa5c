"""Native CPU kernels for quantized matrix-vector products (decoding). Placeholder: being written."""

from __future__ import annotations

import jax


def wanted(rows: int, dtype) -> bool:
    """Whether :func:`qmatmul` should compute a quantized matmul of ``rows`` rows (CPU, few rows)."""
    return False


def qmatmul(x: jax.Array, q: jax.Array, scale: jax.Array, mode: str) -> jax.Array:
    raise NotImplementedError
