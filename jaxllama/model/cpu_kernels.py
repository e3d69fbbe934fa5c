"""Native CPU kernels for the matrix products of decoding (int8 / int4 and float32 weights), called
through the XLA FFI.

float32 (:func:`fmatmul`, ``cpu_fmatmul.cc``): see the section below; the rest of this docstring is
about the quantized products (:func:`qmatmul`, ``cpu_kernels.cc``). Both files include
``cpu_kernels.h`` (the vector type, the worker threads) and build into one library.

Why this exists: decoding a few rows reads every weight once per token, so it is bound by memory
bandwidth, and int8 / int4 weights should make it 4x / 8x cheaper than float32. XLA:CPU turns that
into a loss: on a 2-core AMD EPYC (AVX-512), with the 135M Llama's matrices, its float32 matvec
reads 25-36 GB/s of weights, but ``jnp.dot(x, q.astype(f32))`` materializes the converted kernel
(~1 GB/s of int8 effective), an int8 x int8 -> int32 ``dot_general`` runs at ~1 GB/s, and the best
fused form, ``(q.astype(f32) * x).sum(-1)``, reaches ~7 GB/s. llama.cpp decodes Q8_0 ~2.5x faster
than float32 on the same machine. Qwix (or any other JAX-level quantization library) does not help
on CPU: it lowers to the same XLA converts and dot_generals. So this module compiles a small C++
kernel (``cpu_kernels.cc``, next to this file) that reads the quantized bytes directly, converts
them to float in registers and multiplies each weight into up to 8 rows of ``x`` at once (16 rows:
two passes over weights still in L1), with AVX-512 (or AVX2, or plain C++ the compiler
vectorizes), software prefetch, and one worker thread per further CPU (its own: XLA's intra-op
pool took ~280 us to start a task; ``JAXLLAMA_KERNEL_THREADS`` caps the threads, caller included).

Exactness: :func:`qmatmul` equals ``x @ quant.dequantize(q, scale, mode)`` to float32 rounding:
weights are converted exactly and multiplied by float32 ``x`` with float32 FMAs, only the order of
the sums differs (tests: within ``4e-7 * sqrt(in) * max|y|`` of a float64 reference, as XLA's own
float32 path is). It does not quantize ``x`` to int8 for integer dot products (llama.cpp's way,
``vpdpbusd``), which would be faster where the FMAs are the cost (8+ rows) but not float32-exact.

The layout is :mod:`jaxllama.model.quant`'s: ``q`` ``[out, in]`` int8, or ``[out, in/2]`` uint8 with
two int4 values per byte; ``scale`` ``[out, in/g]`` float32.

Built lazily, the first time :func:`wanted` is asked on a CPU backend, with the system C++ compiler
(``$CXX``, else ``c++`` / ``g++`` from PATH; ``-O3 -march=native``, ~10 s), and cached under
``$JAXLLAMA_CACHE/kernels`` (else ``~/.cache/jaxllama/kernels``) by a hash of the sources, the flags,
the compiler, the CPU's flags and the JAX version; the library is written to a temporary file and
renamed into place, so processes building at once do not see each other's half-written files.
Without a compiler, or if the build fails, :func:`wanted` is False (quant.matmul's XLA path) and
one warning says why.

Sharding: the FFI call has no partitioning rule, so the kernel is meant for weights on one device
or fully replicated (CPU decoding). Under ``jit`` with sharded operands XLA's partitioner gathers
them and runs the call replicated on every device: correct, but every device reads every weight.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_kernels.cc", HERE / "cpu_fmatmul.cc", HERE / "cpu_attention.cc", HERE / "cpu_flash.cc")  # one library
HEADERS = (HERE / "cpu_kernels.h",)
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17")
TARGETS = {"int8": "jaxllama_qmatmul_int8", "int4": "jaxllama_qmatmul_int4"}
F_TARGETS = {"io": "jaxllama_fmatmul_io", "oi": "jaxllama_fmatmul_oi"}  # float32: w [in, out] / [out, in]
ATTENTION_TARGETS = ("jaxllama_decode_attention", "jaxllama_decode_attention_int8")  # float / int8 cache
FLASH_TARGETS = ("jaxllama_flash_forward", "jaxllama_flash_backward")  # training attention (cpu_flash.cc)
# Rows up to which the kernel beats XLA's dequantize-then-matmul (measured on the 135M matrices,
# 2-core EPYC, the two interleaved: 1 row 22-32x faster, 16 rows ~5x, 32 rows ~3.3x, 128 rows
# 1.2-1.5x, 192 rows 1.04-1.34x, 256 rows 0.72-1.07x, 512 rows 0.76-0.97x).
MAX_ROWS = 128

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once decided; "why": the reason it is not; "isa": the vector unit


COMPILERS = ("c++", "g++")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), *COMPILERS):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds for them; a shared cache must not mix CPUs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLLAMA_CACHE") or "~/.cache/jaxllama").expanduser() / "kernels"


def _build() -> Path:
    """The compiled library's path (built now unless cached); raises RuntimeError with the reason."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    include = jax.ffi.include_dir()
    source = b"\0".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cxx.encode(), jax.__version__.encode(),
                                     _cpu_flags().encode(), include.encode()])).hexdigest()[:20]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        r = subprocess.run([cxx, *FLAGS, "-I", include, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if r.returncode:
            err = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.splitlines() or ["?"]
            raise RuntimeError(f"{Path(cxx).name} failed on {', '.join(f.name for f in SOURCES)} (exit {r.returncode}): {err[0].strip()}")
        os.replace(tmp, out)
    except OSError as e:
        raise RuntimeError(f"cannot build the kernels into {out.parent}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Whether the native kernel is built and registered (builds it on the first call)."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        try:
            lib = ctypes.CDLL(str(_build()))
            for target in (*TARGETS.values(), *F_TARGETS.values(), *ATTENTION_TARGETS, *FLASH_TARGETS):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
            lib.jaxllama_qmatmul_isa.restype = ctypes.c_char_p
            _state.update(ok=True, isa=lib.jaxllama_qmatmul_isa().decode(), lib=lib)
        except (RuntimeError, OSError, AttributeError) as e:
            _state.update(ok=False, why=str(e))
            log.warning("jaxllama: native CPU matmuls unavailable (%s); decoding uses XLA's", e)
        return _state["ok"]


def wanted(rows: int, dtype) -> bool:
    """Whether :func:`qmatmul` should compute a quantized matmul of ``rows`` rows in ``dtype``: the
    default backend is CPU, the result is float32, ``rows`` is few (decoding) and the kernel built."""
    if rows > MAX_ROWS or rows < 1 or jnp.dtype(dtype) != jnp.float32 or jax.default_backend() != "cpu":
        return False
    return available()


def reference(x: jax.Array, q: jax.Array, scale: jax.Array, mode: str) -> jax.Array:
    """XLA's ``x @ dequantize(q, scale)`` in float32 (the fallback, and the backward pass)."""
    from jaxllama.model import quant

    w = quant.dequantize_rows(q, scale.astype(jnp.float32), mode, jnp.float32)  # [out, in]
    return jax.lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (1,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST)


def _native(x: jax.Array, q: jax.Array, scale: jax.Array, mode: str) -> jax.Array:
    *lead, d_in = x.shape
    d_out = q.shape[0]
    x2 = x.astype(jnp.float32).reshape(-1, d_in)
    call = jax.ffi.ffi_call(TARGETS[mode], jax.ShapeDtypeStruct((x2.shape[0], d_out), jnp.float32),
                            vmap_method="sequential")
    return call(x2, q, scale.astype(jnp.float32)).reshape(*lead, d_out)


def _fwd(x, q, scale, mode):
    return _native(x, q, scale, mode), (x, q, scale)


def _bwd(mode, res, g):
    x, q, scale = res
    _, vjp = jax.vjp(lambda x, s: reference(x, q, s, mode), x, scale)
    dx, ds = vjp(g)
    return dx.astype(x.dtype), None, ds.astype(scale.dtype)


_qmatmul = jax.custom_vjp(lambda x, q, scale, mode: _native(x, q, scale, mode), nondiff_argnums=(3,))
_qmatmul.defvjp(_fwd, lambda mode, res, g: _bwd(mode, res, g))


def qmatmul(x: jax.Array, q: jax.Array, scale: jax.Array, mode: str) -> jax.Array:
    """``x @ W`` ``[..., out]`` float32 for ``x`` ``[..., in]``, ``W[i, o] = value(q[o, i]) * scale[o, i // g]``
    (mode ``int8`` or ``int4``; layout of :mod:`jaxllama.model.quant`). Differentiable in ``x`` and
    ``scale`` (the backward pass is XLA's). Falls back to XLA when the kernel is unavailable."""
    if mode not in TARGETS:
        raise ValueError(f"qmatmul: mode {mode!r} is not int8 or int4")
    if q.ndim != 2 or scale.ndim != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError(f"qmatmul: q {q.shape} and scale {scale.shape} must be [out, in(/2)] and [out, groups]")
    d_in = q.shape[1] * (2 if mode == "int4" else 1)
    if x.shape[-1] != d_in or d_in % scale.shape[1] or (mode == "int4" and (d_in // scale.shape[1]) % 2):
        raise ValueError(f"qmatmul: x {x.shape}, q {q.shape} and scale {scale.shape} do not agree ({mode})")
    if not available():
        return reference(x, q, scale, mode)
    return _qmatmul(x, q, scale, mode)


# ---- float32 weights ------------------------------------------------------------------------------
# XLA:CPU's float32 matrix-vector product reads the weights at ~10 GB/s on one core (2-core Xeon,
# the 135M shape's matrices, profiled inside the decode step), a fifth of the memory bandwidth; and
# a tied head ``x @ E.T`` is a transposing copy plus a dot. These kernels read each weight once,
# on every core, in the layout it is stored in; :func:`decode_attention` does one step's attention
# over the cache (float32 or int8) the same way. Only while decoding (:func:`decoding`): the model's
# training and prefill products stay XLA's, and so does any sharded program (the FFI call has no
# partitioning rule; gathered weights would cost more than the kernel saves).

_decoding = contextvars.ContextVar("jaxllama_native_decoding", default=False)


@contextlib.contextmanager
def decoding(on: bool = True) -> Iterator[None]:
    """While tracing a decode step: float32 products of few rows may use the native kernels."""
    token = _decoding.set(on)
    try:
        yield
    finally:
        _decoding.reset(token)


def wanted_f32(rows: int | None, *dtypes) -> bool:
    """Whether :func:`fmatmul` (or, ``rows`` None, :func:`decode_attention`) should compute a product
    of ``rows`` rows: inside :func:`decoding`, float32 operands, few rows, a CPU backend and the
    kernels built."""
    if not _decoding.get() or any(jnp.dtype(d) != jnp.float32 for d in dtypes):
        return False
    return wanted(MAX_ROWS if rows is None else rows, jnp.float32)


def _f_native(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    *lead, d_in = x.shape
    d_out = w.shape[1] if layout == "io" else w.shape[0]
    call = jax.ffi.ffi_call(F_TARGETS[layout], jax.ShapeDtypeStruct((math.prod(lead), d_out), jnp.float32),
                            vmap_method="sequential")
    return call(x.reshape(-1, d_in), w).reshape(*lead, d_out)


def _f_reference(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    return jnp.dot(x, w) if layout == "io" else jnp.dot(x, w.T)


_fmatmul = jax.custom_vjp(_f_native, nondiff_argnums=(2,))
_fmatmul.defvjp(lambda x, w, layout: (_f_native(x, w, layout), (x, w)),
                lambda layout, res, g: jax.vjp(lambda x, w: _f_reference(x, w, layout), *res)[1](g))


def fmatmul(x: jax.Array, w: jax.Array, layout: str = "io") -> jax.Array:
    """float32 ``x @ w`` (layout ``io``: ``w`` [in, out]) or ``x @ w.T`` (``oi``: ``w`` [out, in], a tied
    head) for ``x`` [..., in], by the native kernel; XLA's product when the kernel is unavailable.
    Differentiable (the backward pass is XLA's)."""
    if layout not in F_TARGETS:
        raise ValueError(f"fmatmul: layout {layout!r} is not io or oi")
    d_in = w.shape[0] if layout == "io" else w.shape[1]
    if w.ndim != 2 or x.shape[-1] != d_in:
        raise ValueError(f"fmatmul: x {x.shape} and w {w.shape} do not agree ({layout})")
    if not available():
        return _f_reference(x, w, layout)
    return _fmatmul(x.astype(jnp.float32), w.astype(jnp.float32), layout)


def decode_attention(q: jax.Array, k_cache, v_cache, n: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One decode step's attention (``cpu_attention.cc``): ``q`` [b, kv_heads, group, d] over slots
    ``0..n[b]-1`` of the heads-major caches [b, kv_heads, s, d] (each an array, or an int8 cache's
    (values, scales [b, kv_heads, s, 1])) and the step's own ``k``, ``v`` [b, kv_heads, d]; float32
    [b, kv_heads, group, d]. The result of :func:`jaxllama.model.attention.cached_attention` for one
    new token (not differentiable: decoding only)."""
    f32 = jnp.float32
    int8 = isinstance(k_cache, tuple)
    call = jax.ffi.ffi_call(ATTENTION_TARGETS[int8], jax.ShapeDtypeStruct(q.shape, f32), vmap_method="sequential")
    caches = (*k_cache, *v_cache) if int8 else (k_cache.astype(f32), v_cache.astype(f32))
    return call(q.astype(f32), *caches, n.astype(jnp.int32), k.astype(f32), v.astype(f32))


# ---- training attention ---------------------------------------------------------------------------
# XLA:CPU runs the reference attention (attention.xla_attention) as full [t, t] score blocks, forward
# and again in the backward, plus float32 elementwise passes over them, mostly on one core: at the
# tiny preset's seq 1024 it is most of a train step. cpu_flash.cc is a blocked (flash) kernel that
# skips the masked half and runs on every core.


def flash_lanes() -> int:
    """The kernel's float32 vector width: head_dim must be a multiple of it."""
    return 16 if _state.get("isa") == "avx512" else 8


def flash_supported(q: jax.Array, k: jax.Array) -> bool:
    """Whether :func:`flash_attention` takes ``q`` [b, t, h, d] and ``k`` [b, t, kv, d]: self-attention
    (as long as the keys), whole query groups of at most 64 heads, ``d`` a multiple of the vector
    width, and the kernels built."""
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2] or h // k.shape[2] > 64 or not available():
        return False
    return d % flash_lanes() == 0


def _flash_forward(q, k, v, seg):
    b, t, h, _ = q.shape
    f32 = jnp.float32
    call = jax.ffi.ffi_call(FLASH_TARGETS[0], (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct((b, h, t), f32)),
                            vmap_method="sequential")
    return call(q, k, v, seg)


@jax.custom_vjp
def _flash(q, k, v, seg):
    return _flash_forward(q, k, v, seg)[0]


def _flash_fwd(q, k, v, seg):
    out, lse = _flash_forward(q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(res, d_out):
    q, k, v, seg, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call(FLASH_TARGETS[1], shapes, vmap_method="sequential")
    dq, dk, dv = call(q, k, v, seg, out, lse, d_out.astype(jnp.float32))
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Causal grouped-query attention (``cpu_flash.cc``), differentiable: the result of
    :func:`jaxllama.model.attention.xla_attention` for ``q`` [b, t, h, d], ``k``, ``v`` [b, t, kv, d]
    and ``segment_ids`` [b, t] or None, computed in float32 (check :func:`flash_supported` first)."""
    if not available():
        raise RuntimeError(f"flash_attention: the native CPU kernels are unavailable ({_state.get('why')})")
    f32 = jnp.float32
    seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return _flash(q.astype(f32), k.astype(f32), v.astype(f32), seg).astype(q.dtype)
