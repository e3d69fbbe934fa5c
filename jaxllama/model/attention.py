"""Causal (grouped-query) attention kernels. All share one signature and one result.

``q``: [batch, q_len, heads, head_dim]; ``k``, ``v``: [batch, kv_len, kv_heads, head_dim];
``segment_ids``: [batch, len] or None (a token attends only to earlier tokens of its own segment).
Softmax runs in float32 whatever the compute dtype.

- ``xla``: the readable reference, plain einsums.
- ``dot_product`` / ``cudnn``: :func:`jax.nn.dot_product_attention` (XLA, or cuDNN flash on GPU).
- ``cpu_flash``: a native blocked (flash) kernel for CPU training (``cpu_flash.cc``), forward and
  backward, skipping the masked half; what ``auto`` picks on CPU.
- ``splash``: the TPU Pallas splash kernel, run per shard under ``shard_map``; on CPU it runs in
  Pallas interpret mode, which is how the tests check it against the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.model import cpu_kernels, quant
from jaxllama.parallel.mesh import mesh_platform

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def causal_mask(segment_ids: jax.Array | None, q_len: int, kv_len: int) -> jax.Array:
    """[batch or 1, q_len, kv_len] boolean: causal, and within one segment when segment_ids is given."""
    mask = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool), k=kv_len - q_len)[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, -q_len:, None] == segment_ids[:, None, :])
    return mask


def _heads_major(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [b, t, h, d] -> [b, kv_heads, group * t, d] (the query heads of one KV head as one block of
    rows); k, v [b, s, kv_heads, d] -> [b, kv_heads, s, d]. Every matmul below is then a plain
    batched [rows, inner] x [inner, cols] product."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qh = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, d)
    return qh, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)


def _scores(qh: jax.Array, kh: jax.Array, segment_ids: jax.Array | None, t: int) -> jax.Array:
    """Masked float32 scores [b, kv_heads, group * t, s] of head-major q and k."""
    b, kv_heads, rows, d = qh.shape
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32) / np.sqrt(d)
    scores = scores.reshape(b, kv_heads, rows // t, t, kh.shape[2])
    # An additive [batch, t, s] bias, broadcast over heads inside the add: a select against a mask
    # broadcast to every head makes XLA:CPU write that mask (and the fill value) out in full.
    bias = jnp.where(causal_mask(segment_ids, t, kh.shape[2]), 0.0, MASK_VALUE).astype(jnp.float32)
    return (scores + bias[:, None, None]).reshape(b, kv_heads, rows, kh.shape[2])


def _from_heads_major(x: jax.Array, shape: tuple) -> jax.Array:
    b, t, h, d = shape
    kv_heads = x.shape[1]
    return x.reshape(b, kv_heads, h // kv_heads, t, d).transpose(0, 3, 1, 2, 4).reshape(shape)


@jax.custom_vjp
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The reference: plain einsums and a float32 softmax.

    Its backward keeps what a flash kernel keeps -- q, k, v, the output and the log-sum-exp per
    query -- and recomputes the probabilities from them, instead of autodiff's float32 [seq, seq]
    probabilities and mask for every layer (on CPU a tenth of the train-step time is writing and
    reading those back; on any backend they are most of the activation memory at long sequences).
    """
    return _xla_forward(q, k, v, segment_ids)[0]


def _xla_forward(q, k, v, segment_ids):
    qh, kh, vh = _heads_major(q, k, v)
    scores = _scores(qh, kh, segment_ids, q.shape[1])
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None]).astype(v.dtype)
    return _from_heads_major(jnp.einsum("bkqs,bksd->bkqd", probs, vh), q.shape), lse


def _xla_fwd(q, k, v, segment_ids):
    out, lse = _xla_forward(q, k, v, segment_ids)
    return out, (q, k, v, segment_ids, out, lse)


def _xla_bwd(res, d_out):
    q, k, v, segment_ids, out, lse = res
    d = q.shape[-1]
    qh, kh, vh = _heads_major(q, k, v)
    doh, oh = _heads_major(d_out, k, v)[0], _heads_major(out, k, v)[0]
    probs = jnp.exp(_scores(qh, kh, segment_ids, q.shape[1]) - lse[..., None])  # float32; masked: exactly 0
    # Contractions over query rows take the small [rows, d] operand transposed (not the [rows, s] one).
    dvh = jnp.einsum("bkdq,bkqs->bksd", jnp.swapaxes(doh, 2, 3), probs.astype(v.dtype))
    dp = jnp.einsum("bkqd,bksd->bkqs", doh, vh, preferred_element_type=jnp.float32)
    delta = jnp.sum(doh.astype(jnp.float32) * oh.astype(jnp.float32), axis=-1)
    ds = (probs * (dp - delta[..., None]) / np.sqrt(d)).astype(q.dtype)
    dqh = jnp.einsum("bkqs,bksd->bkqd", ds, kh)
    dkh = jnp.einsum("bkdq,bkqs->bksd", jnp.swapaxes(qh, 2, 3), ds)
    return _from_heads_major(dqh, q.shape), jnp.swapaxes(dkh, 1, 2), jnp.swapaxes(dvh, 1, 2), None


xla_attention.defvjp(_xla_fwd, _xla_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                          implementation: str | None = None, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """``jax.nn.dot_product_attention`` with our causal/segment mask. On CPU, float16 runs in float32:
    XLA's CPU backend has no float16 matmul accumulating in float32 (``F16_F16_F32``), which the
    gradient of the XLA implementation asks for (CPU computes float16 matmuls in float32 anyway)."""
    dtype = q.dtype
    if dtype == jnp.float16 and implementation is None and _platform(mesh) == "cpu":
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if segment_ids is None:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    else:
        mask = causal_mask(segment_ids, q.shape[1], k.shape[1])[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out.astype(dtype)


def _platform(mesh: jax.sharding.Mesh | None) -> str:
    """The platform the program is compiled for: the mesh's devices, else JAX's default backend."""
    return mesh_platform(mesh) or jax.default_backend()


SPLASH_BLOCK = 128  # splash works in blocks of 128 positions (its minimum block on TPU)


def splash_supports(q_len: int) -> bool:
    """Whether the splash kernel takes this sequence length (whole blocks of :data:`SPLASH_BLOCK`)."""
    return q_len % SPLASH_BLOCK == 0


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     mesh: jax.sharding.Mesh | None = None, batch_axes=None, head_axes=None,
                     kv_head_axes=None) -> jax.Array:
    """TPU splash attention. ``batch_axes``/``head_axes``/``kv_head_axes``: the mesh axes the batch,
    query heads and KV heads are split over (from the logical rules); the kernel runs once per shard
    under ``shard_map``. When KV heads are split differently from query heads (e.g. kept whole on
    every device), K and V are repeated to the query head count first, so each shard holds the KV
    heads of its own query heads.

    Grouped-query attention runs as one multi-query kernel per KV head (vmapped over KV heads and
    rows), as MaxText does: K and V are never repeated to the query head count, so their gradients
    are computed once per KV head, not once per query head.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    # Interpret (plain HLO) unless compiling for TPUs: the mesh's devices say, not the default backend,
    # so compiling for a TPU topology from a CPU host (compile-check --target) builds the real kernel.
    interpret = _platform(mesh) != "tpu"
    block = next(n for n in (512, 256, SPLASH_BLOCK) if t % n == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)

    def per_shard(q, k, v, seg):
        kv_heads = k.shape[2]
        group = q.shape[2] // kv_heads
        mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
        kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
        # q: [b, t, kv_heads * group, d] -> [b, kv_heads, group, t, d]; k, v: [b, kv_heads, t, d].
        qg = jnp.moveaxis(q.reshape(q.shape[0], t, kv_heads, group, d), 1, 3) / np.sqrt(d)
        kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

        def one_row(qr, kr, vr, s):
            ids = sk.SegmentIds(q=s, kv=s)
            return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(qr, kr, vr)

        out = jax.vmap(one_row)(qg, kh, vh, seg)  # [b, kv_heads, group, t, d]
        return jnp.moveaxis(out, 3, 1).reshape(q.shape)

    return _per_shard(per_shard, q, k, v, segment_ids, mesh, batch_axes, head_axes, kv_head_axes)


def _per_shard(fn, q, k, v, segment_ids, mesh, batch_axes, head_axes, kv_head_axes):
    """``fn(q, k, v, segment_ids)`` (segment_ids an array) once per shard under ``shard_map``: rows split
    over ``batch_axes``, heads over ``head_axes``, whole sequences. When KV heads are split differently
    from query heads (e.g. kept whole on every device), K and V are repeated to the query head count
    first, so each shard holds the KV heads of its own query heads."""
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, segment_ids)
    if kv_head_axes != head_axes and k.shape[2] != q.shape[2]:
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
    P = jax.sharding.PartitionSpec
    qkv = P(batch_axes, None, head_axes, None)
    call = jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch_axes, None)), out_specs=qkv, check_vma=False)
    return call(q, k, v, segment_ids)


def cpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                        mesh: jax.sharding.Mesh | None = None, batch_axes=None, head_axes=None,
                        kv_head_axes=None) -> jax.Array:
    """The native blocked kernel for CPU training (:func:`jaxllama.model.cpu_kernels.flash_attention`),
    once per shard; the ``xla`` reference where it does not apply (another platform, no C++ compiler, a
    head size that is not a whole number of vectors, a query shorter than its keys)."""
    if _platform(mesh) != "cpu" or not cpu_kernels.flash_supported(q, k):
        return xla_attention(q, k, v, segment_ids)
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    return _per_shard(cpu_kernels.flash_attention, q, k, v, segment_ids, mesh, batch_axes, head_axes, kv_head_axes)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_positions: jax.Array,
                     k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention of new tokens over a KV cache *before* they are written to it, and over themselves.

    ``q``, ``k``, ``v`` [batch, t, heads or kv_heads, head_dim]: t new tokens of each row at
    consecutive positions ``q_positions`` [batch, t] (t = 1: a decode step, each row at its own
    position; t > 1: a chunk continuing a prompt). Caches heads-major [batch, kv_heads, cache_len,
    head_dim] (:data:`jaxllama.model.llama.LAYER_CACHE_AXES`; an int8 cache: (values, scales) each,
    dequantized here, or read as int8 by the CPU kernel), slot j holding position j of the same
    row: a query sees the slots before its row's first new position (later slots are stale or
    padding: masked) and the new tokens up to itself. So rows of different lengths share one cache
    with no bookkeeping here; and the cache's only reader is this step's attention, not also the
    write that follows, which XLA then does in place (attending to the written cache made it copy
    every layer's cache several times a step). Products are batched over (batch, kv_heads) with the
    cache in place; only the few new rows are transposed.
    """
    b, t, h, d = q.shape
    int8 = isinstance(k_cache, tuple)  # (int8 values, float32 scales): quant.quantize_kv's
    kv_heads, s = (k_cache[0] if int8 else k_cache).shape[1:3]
    floats = (k_cache[1].dtype, v_cache[1].dtype) if int8 else (k_cache.dtype, v_cache.dtype)  # int8: the scales
    if t == 1 and cpu_kernels.wanted_f32(None, q.dtype, *floats):  # CPU decoding
        out = cpu_kernels.decode_attention(q.reshape(b, kv_heads, h // kv_heads, d), k_cache, v_cache,
                                           q_positions[:, 0], k[:, 0], v[:, 0])
        return out.reshape(b, t, h, d).astype(q.dtype)
    if int8:
        k_cache, v_cache = (quant.dequantize_kv(*c, q.dtype) for c in (k_cache, v_cache))
    qh, kh, vh = _heads_major(q, k, v)  # [b, kv_heads, group * t, d], [b, kv_heads, t, d]
    old = jnp.einsum("bkqd,bksd->bkqs", qh, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    new = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    old = jnp.where((jnp.arange(s)[None, :] < q_positions[:, :1])[:, None, None, None],
                    old.reshape(b, kv_heads, h // kv_heads, t, s), MASK_VALUE)
    new = jnp.where(jnp.tril(jnp.ones((t, t), bool)), new.reshape(b, kv_heads, h // kv_heads, t, t), MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1) / np.sqrt(d), axis=-1)
    p_old, p_new = (x.reshape(b, kv_heads, -1, x.shape[-1]).astype(v.dtype) for x in (probs[..., :s], probs[..., s:]))
    out = jnp.einsum("bkqs,bksd->bkqd", p_old, v_cache.astype(v.dtype)) + jnp.einsum("bkqs,bksd->bkqd", p_new, vh)
    return _from_heads_major(out, (b, t, h, d)).astype(q.dtype)


def resolve_impl(name: str, dtype: str | None = None) -> str:
    """``auto`` picks the fastest kernel for the backend in use: splash on TPU; on GPU cuDNN flash
    attention, which takes only half-precision inputs (float32 runs XLA's ``dot_product``); on CPU the
    native flash kernel."""
    if name != "auto":
        return name
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn" if dtype in (None, "bfloat16", "float16") else "dot_product"
    return {"tpu": "splash", "cpu": "cpu_flash"}.get(backend, "xla")


def attend(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
           mesh: jax.sharding.Mesh | None = None, batch_axes=None, head_axes=None,
           kv_head_axes=None) -> jax.Array:
    impl = resolve_impl(impl)
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids)
    if impl == "dot_product":
        return dot_product_attention(q, k, v, segment_ids, mesh=mesh)
    if impl == "cudnn":
        return dot_product_attention(q, k, v, segment_ids, implementation="cudnn")
    if impl == "cpu_flash":
        return cpu_flash_attention(q, k, v, segment_ids, mesh, batch_axes, head_axes, kv_head_axes)
    if impl == "splash" and splash_supports(q.shape[1]):
        return splash_attention(q, k, v, segment_ids, mesh, batch_axes, head_axes, kv_head_axes)
    if impl == "splash":  # a length splash does not take (a short prefill): the reference, same result
        return xla_attention(q, k, v, segment_ids)
    raise ValueError(f"unknown attention implementation {impl!r}")


__all__ = ["attend", "cached_attention", "causal_mask", "xla_attention", "dot_product_attention", "splash_attention",
           "cpu_flash_attention", "resolve_impl"]
