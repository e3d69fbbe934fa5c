"""Causal (grouped-query) attention kernels. All share one signature and one result.

``q``: [batch, q_len, heads, head_dim]; ``k``, ``v``: [batch, kv_len, kv_heads, head_dim];
``segment_ids``: [batch, len] or None (a token attends only to earlier tokens of its own segment).
Softmax runs in float32 whatever the compute dtype.

- ``xla``: the readable reference, plain einsums.
- ``dot_product`` / ``cudnn``: :func:`jax.nn.dot_product_attention` (XLA, or cuDNN flash on GPU).
- ``splash``: the TPU Pallas splash kernel, run per shard under ``shard_map``; on CPU it runs in
  Pallas interpret mode, which is how the tests check it against the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def causal_mask(segment_ids: jax.Array | None, q_len: int, kv_len: int) -> jax.Array:
    """[batch or 1, q_len, kv_len] boolean: causal, and within one segment when segment_ids is given."""
    mask = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool), k=kv_len - q_len)[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, -q_len:, None] == segment_ids[:, None, :])
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(d)
    mask = causal_mask(segment_ids, t, k.shape[1])[:, None, None]
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                          implementation: str | None = None) -> jax.Array:
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    mask = causal_mask(segment_ids, q.shape[1], k.shape[1])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     mesh: jax.sharding.Mesh | None = None, batch_axes=None, head_axes=None) -> jax.Array:
    """TPU splash attention. ``batch_axes``/``head_axes``: the mesh axes the batch and heads are split
    over (from the logical rules); the kernel runs once per shard under ``shard_map``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    interpret = jax.default_backend() != "tpu"
    block = min(512, t)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)

    def per_shard(q, k, v, seg):
        heads = q.shape[2]
        mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
        kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        group = heads // k.shape[2]
        # The kernel wants [heads, len, head_dim] per example and the same head count for k and v.
        qh = jnp.swapaxes(q, 1, 2) / np.sqrt(d)
        kh = jnp.repeat(jnp.swapaxes(k, 1, 2), group, axis=1)
        vh = jnp.repeat(jnp.swapaxes(v, 1, 2), group, axis=1)
        out = jax.vmap(lambda a, b_, c, s: kernel(a, b_, c, segment_ids=sk.SegmentIds(q=s, kv=s)))(qh, kh, vh, seg)
        return jnp.swapaxes(out, 1, 2)

    if mesh is None or mesh.size == 1:
        return per_shard(q, k, v, segment_ids)
    P = jax.sharding.PartitionSpec
    qkv = P(batch_axes, None, head_axes, None)
    fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch_axes, None)), out_specs=qkv,
                       check_vma=False)
    return fn(q, k, v, segment_ids)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_positions: jax.Array) -> jax.Array:
    """Decode-step attention over a KV cache whose slot j holds position j of the same row.

    ``q`` [batch, q_len, heads, head_dim] at ``q_positions`` [batch, q_len]; caches [batch, cache_len,
    kv_heads, head_dim]. A query sees slots 0..its position; later slots (stale or padding) are masked,
    so rows of different lengths share one cache without any per-row bookkeeping here.
    """
    b, t, h, d = q.shape
    kv_heads, s = k_cache.shape[2], k_cache.shape[1]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(d)
    mask = (jnp.arange(s)[None, None, :] <= q_positions[:, :, None])[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache)
    return out.reshape(b, t, h, d).astype(q.dtype)


def resolve_impl(name: str) -> str:
    """``auto`` picks the fastest kernel for the backend in use."""
    if name != "auto":
        return name
    backend = jax.default_backend()
    return {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")


def attend(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
           mesh: jax.sharding.Mesh | None = None, batch_axes=None, head_axes=None) -> jax.Array:
    impl = resolve_impl(impl)
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids)
    if impl == "dot_product":
        return dot_product_attention(q, k, v, segment_ids)
    if impl == "cudnn":
        return dot_product_attention(q, k, v, segment_ids, implementation="cudnn")
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, mesh, batch_axes, head_axes)
    raise ValueError(f"unknown attention implementation {impl!r}")


__all__ = ["attend", "cached_attention", "causal_mask", "xla_attention", "dot_product_attention", "splash_attention", "resolve_impl"]
