"""The native CPU float32 kernels of decoding: the matmuls (jaxllama.model.cpu_kernels.fmatmul,
cpu_fmatmul.cc) equal a float64 product in both weight layouts, at every row count and odd size,
and their gradient is XLA's; the decode-step attention (decode_attention, cpu_attention.cc) equals
the XLA reference (attention.cached_attention) at any fill of the cache; the model's decode step
uses them (only while decoding, only unsharded) with the logits of XLA's path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.model import attention, cpu_kernels
from jaxllama.model.llama import Arch, Llama

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels")


@pytest.fixture(autouse=True, scope="module")
def _built():
    if not cpu_kernels.available():
        pytest.skip(f"the native kernels are not built: {cpu_kernels._state.get('why')}")


# (in, out): the 135M shapes (large enough to be split between threads), sizes that are not a
# multiple of the vector width (column tails, partial vectors), fewer inputs than a 4-row step.
SHAPES = [(576, 576), (576, 192), (1536, 576), (64, 4099), (70, 33), (3, 17), (5, 16)]


def _close(got, want, d_in):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=4e-7 * np.sqrt(d_in) * np.abs(want).max())


@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 33])
def test_both_layouts_equal_float64(d_in, d_out, rows):
    rng = np.random.default_rng(rows * 1000 + d_out)
    x = rng.standard_normal((rows, d_in), np.float32)
    w = rng.standard_normal((d_in, d_out), np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    io = jax.jit(lambda x, w: cpu_kernels.fmatmul(x, w, "io"))(x, w)
    oi = jax.jit(lambda x, w: cpu_kernels.fmatmul(x, w, "oi"))(x, np.ascontiguousarray(w.T))
    assert io.shape == oi.shape == (rows, d_out) and io.dtype == jnp.float32
    _close(io, want, d_in)
    _close(oi, want, d_in)


def test_leading_dims_loop_and_gradient():
    """[batch, 1, in] inputs (a decode step's), inside a while_loop, and the VJP equals XLA's."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 1, 96), np.float32))
    w = jnp.asarray(rng.standard_normal((96, 80), np.float32))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    _close(cpu_kernels.fmatmul(x, w), want, 96)

    def body(i, acc):
        return acc + cpu_kernels.fmatmul(x * (i + 1.0), w)

    _close(jax.jit(lambda: jax.lax.fori_loop(0, 3, body, jnp.zeros((4, 1, 80))))(), 6 * want, 96)
    for layout, weights in (("io", w), ("oi", w.T)):
        got = jax.grad(lambda x, w: jnp.sum(jnp.sin(cpu_kernels.fmatmul(x, w, layout))), argnums=(0, 1))(x, weights)
        ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ (w if layout == "io" else w.T))), argnums=(0, 1))(x, weights)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="do not agree"):
        cpu_kernels.fmatmul(jnp.ones((2, 5)), jnp.ones((6, 3)))
    with pytest.raises(ValueError, match="layout"):
        cpu_kernels.fmatmul(jnp.ones((2, 5)), jnp.ones((5, 3)), "ji")


# (batch, kv_heads, heads, head_dim, cache_len): the 135M shape's at batch 1 and 16, one KV head
# for 20 query heads (more than the kernel's 16 a pass), head dims that are not a multiple of the
# vector width.
ATTN = [(1, 3, 9, 64, 144), (16, 3, 9, 64, 144), (3, 1, 20, 24, 5), (2, 2, 2, 70, 33), (4, 2, 4, 16, 64)]


@pytest.mark.parametrize("b,kv,h,d,s", ATTN)
def test_decode_attention_equals_reference(b, kv, h, d, s):
    """Rows at every fill: no cached slot (the new token alone), some, all, and a position past the
    cache (a server's idle slot: every slot visible)."""
    rng = np.random.default_rng(b * 100 + s)
    kc, vc = (jnp.asarray(rng.standard_normal((b, kv, s, d), np.float32)) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((b, 1, h, d), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((b, 1, kv, d), np.float32)) for _ in range(2))
    fills = np.array([0, s // 2, s, s + 7] * b)[:b]
    pos = jnp.asarray(fills[:, None], jnp.int32)
    want = np.asarray(attention.cached_attention(q, kc, vc, pos, k, v))  # outside decoding(): XLA's

    def native(*args):
        with cpu_kernels.decoding():
            return attention.cached_attention(*args)

    text = jax.jit(native).lower(q, kc, vc, pos, k, v).as_text()
    assert "call @jaxllama_decode_attention" in text
    got = np.asarray(jax.jit(native)(q, kc, vc, pos, k, v))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    np.testing.assert_allclose(got[0], np.broadcast_to(np.repeat(np.asarray(v)[0, 0], h // kv, axis=0), got[0].shape),
                               rtol=0, atol=1e-6)  # row 0 has nothing cached: its own value


def _tiny(tied: bool) -> Arch:
    return Arch(vocab_size=203, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                max_position=64, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=tied, scan_layers=False)


@pytest.mark.parametrize("tied", [True, False])
def test_decode_step_uses_kernels_with_xla_logits(tied, monkeypatch):
    """One prefill and two decode steps: the native path's logits and cache equal XLA's (kernels off);
    the decode step's program calls the kernels (io for the projections, oi for a tied head), the
    prefill's (more rows than MAX_ROWS) and training's forward do not."""
    a = _tiny(tied)
    model = Llama(a)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim == 2 else p, params)  # O(1) logits
    b, prompt = 3, 50
    tokens = jax.random.randint(jax.random.key(1), (b, prompt), 0, a.vocab_size)
    zeros = jnp.zeros((b, a.n_kv_heads, 64, a.head_dim))

    def run():
        pos = jnp.broadcast_to(jnp.arange(prompt), (b, prompt))
        apply = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, c, method=Llama.decode))
        cache = tuple((zeros, zeros) for _ in range(a.n_layers))
        out, cache = apply(params, tokens, pos, cache)
        logits = [out]
        for step in range(2):
            nxt = jnp.argmax(logits[-1], -1)[:, None].astype(jnp.int32)
            out, cache = apply(params, nxt, jnp.full((b, 1), prompt + step), cache)
            logits.append(out)
        text = apply.lower(params, tokens[:, :1], jnp.zeros((b, 1), jnp.int32), cache).as_text()
        prefill_text = apply.lower(params, tokens, pos, cache).as_text()
        return np.stack(logits), cache, text, prefill_text

    native, cache, text, prefill_text = run()
    calls = 7 * a.n_layers + 1  # the projections and the head
    assert text.count("call @jaxllama_fmatmul_io") == calls - tied and text.count("call @jaxllama_fmatmul_oi") == tied
    assert text.count("call @jaxllama_decode_attention") == a.n_layers
    # The prefill's projections have b * prompt = 150 rows > MAX_ROWS: XLA's; its head only the last rows.
    assert prefill_text.count("call @jaxllama_fmatmul") == 1
    train_text = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens[:, :1]).as_text()
    assert "jaxllama_fmatmul" not in train_text
    monkeypatch.setattr(cpu_kernels, "wanted_f32", lambda *_: False)
    ref, ref_cache, ref_text, _ = run()
    assert "jaxllama_fmatmul" not in ref_text and "jaxllama_decode_attention" not in ref_text
    np.testing.assert_allclose(native, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    for c, r in zip(jax.tree.leaves(cache), jax.tree.leaves(ref_cache)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(r), rtol=0, atol=1e-4)


def test_sharded_decode_keeps_xla():
    """On a mesh of more than one device the decode step stays XLA's (the FFI call has no partitioning
    rule: it would gather every weight)."""
    from jaxllama.infer.placement import inference_program

    a = dataclasses.replace(_tiny(True), vocab_size=208)
    layout = inference_program(a, {"data": 1, "fsdp": 1, "tensor": 2}).layout
    model = Llama(a, layout)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    zeros = jax.ShapeDtypeStruct((2, a.n_kv_heads, 64, a.head_dim), jnp.float32)
    cache = tuple((zeros, zeros) for _ in range(a.n_layers))
    text = jax.jit(lambda p, c: model.apply({"params": p}, jnp.zeros((2, 1), jnp.int32),
                                            jnp.zeros((2, 1), jnp.int32), c, method=Llama.decode)
                   ).lower(params, cache).as_text()
    assert "jaxllama_fmatmul" not in text and "jaxllama_decode_attention" not in text
