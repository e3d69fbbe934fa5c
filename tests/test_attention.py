"""Attention kernels agree; segment ids stop attention (and the model) across packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import arch_for, random_params
from jaxllama.model.attention import attend, xla_attention
from jaxllama.model.llama import Llama


def qkv(b=2, t=32, h=4, k=2, d=16, seed=0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal((b, t, h, d)), jnp.float32),
            jnp.asarray(r.standard_normal((b, t, k, d)), jnp.float32),
            jnp.asarray(r.standard_normal((b, t, k, d)), jnp.float32))


def segments(b=2, t=32):
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3:] = 2
    seg[0, 3 * t // 4:] = 3
    seg[1, t // 2:] = 2
    return jnp.asarray(seg)


def naive(q, k, v, seg):
    """Loop-per-query reference, independent of the vectorized code."""
    q, k, v = map(np.asarray, (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                ok = [j for j in range(i + 1) if seg is None or seg[bi, j] == seg[bi, i]]
                s = np.array([q[bi, i, hi] @ k[bi, j, hi // g] for j in ok]) / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, ok, hi // g]
    return out


@pytest.mark.parametrize("with_segments", [False, True])
def test_xla_matches_naive(with_segments):
    q, k, v = qkv()
    seg = segments() if with_segments else None
    np.testing.assert_allclose(xla_attention(q, k, v, seg), naive(q, k, v, None if seg is None else np.asarray(seg)),
                               atol=1e-5)


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
@pytest.mark.parametrize("with_segments", [False, True])
def test_implementations_agree(impl, with_segments):
    t = 128  # splash works in blocks of 128 positions
    q, k, v = qkv(t=t)
    seg = segments(t=t) if with_segments else None
    ref = xla_attention(q, k, v, seg)
    np.testing.assert_allclose(attend(impl, q, k, v, seg), ref, atol=2e-5)
    # gradients too (splash has its own backward kernels)
    f = lambda fn: jax.grad(lambda q_: jnp.sum(jnp.sin(fn(q_, k, v, seg))))(q)  # noqa: E731
    np.testing.assert_allclose(f(lambda *x: attend(impl, *x)), f(xla_attention), atol=5e-5)


def test_segments_isolate_documents_in_the_model():
    """A packed row equals its documents run separately, and editing one document leaves the other alone."""
    a = arch_for()
    params = random_params(a)
    model = Llama(a)
    r = np.random.default_rng(1)
    doc1, doc2 = r.integers(0, a.vocab_size, 12), r.integers(0, a.vocab_size, 20)
    packed = np.concatenate([doc1, doc2])[None]
    seg = np.array([[1] * 12 + [2] * 20])
    pos = np.concatenate([np.arange(12), np.arange(20)])[None]
    out = np.asarray(model.apply({"params": params}, packed, pos, seg))
    alone1 = np.asarray(model.apply({"params": params}, doc1[None]))
    alone2 = np.asarray(model.apply({"params": params}, doc2[None]))
    np.testing.assert_allclose(out[0, :12], alone1[0], atol=1e-4)
    np.testing.assert_allclose(out[0, 12:], alone2[0], atol=1e-4)
    edited = packed.copy()
    edited[0, :12] = (edited[0, :12] + 1) % a.vocab_size
    out2 = np.asarray(model.apply({"params": params}, edited, pos, seg))
    np.testing.assert_array_equal(out2[0, 12:], out[0, 12:])
    assert np.abs(out2[0, :12] - out[0, :12]).max() > 1e-3
    # without segment ids the second document does see the first
    mixed = np.asarray(model.apply({"params": params}, packed, pos))
    assert np.abs(mixed[0, 12:] - out[0, 12:]).max() > 1e-3


def test_splash_under_shard_map_matches_reference_on_a_mesh():
    """The per-shard splash path (batch over data x fsdp, heads over tensor) equals unsharded xla."""
    import dataclasses

    from jaxllama.config import load_config
    from jaxllama.program import build_program

    cfg = load_config(None, ["model.preset=debug", "data.seq_len=128", "mesh.data=2", "mesh.fsdp=2",
                             "mesh.tensor=2", "model.attention=splash"])
    layout = build_program(cfg).layout
    a = arch_for()
    params = random_params(a)
    tokens = np.random.default_rng(2).integers(0, a.vocab_size, (4, 128))
    seg = np.repeat([[1] * 50 + [2] * 78], 4, 0)
    ref = Llama(a).apply({"params": params}, tokens, None, seg)
    splash = Llama(dataclasses.replace(a, attention="splash"), layout)
    got = jax.jit(lambda p, t, s: splash.apply({"params": p}, t, None, s))(params, tokens, seg)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def plain_attention(q, k, v, seg):
    """Attention as autodiff sees it (no custom gradient): the reference for xla_attention's backward."""
    b, t, h, d = q.shape
    kk, vv = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
    s = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(d)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if seg is not None:
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1), vv)


@pytest.mark.parametrize("with_segments", [False, True])
def test_xla_attention_backward_equals_autodiff(with_segments):
    """xla_attention keeps only q, k, v, out and the log-sum-exp and recomputes the rest: its
    gradients for q, k and v must be autodiff's of the plain formula."""
    q, k, v = qkv(t=48)
    seg = segments(t=48) if with_segments else None
    w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    loss = lambda fn: lambda *x: jnp.sum(jnp.sin(fn(*x, seg)) * w)  # noqa: E731
    got = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


def test_dense_and_swiglu_backward_equal_autodiff():
    from jaxllama.model.llama import dense, swiglu

    r = np.random.default_rng(4)
    x, wg, wu = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((2, 5, 8), (8, 12), (8, 12)))
    ours = lambda x, wg, wu: jnp.sum(jnp.cos(swiglu(dense(x, wg), dense(x, wu))))  # noqa: E731
    plain = lambda x, wg, wu: jnp.sum(jnp.cos(jax.nn.silu(x @ wg) * (x @ wu)))  # noqa: E731
    for g, want in zip(jax.grad(ours, argnums=(0, 1, 2))(x, wg, wu), jax.grad(plain, argnums=(0, 1, 2))(x, wg, wu)):
        np.testing.assert_allclose(g, want, atol=1e-5, rtol=1e-5)
