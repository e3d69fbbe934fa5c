"""The native CPU flash attention (cpu_flash.cc) for training: forward and gradients equal PyTorch's
scaled_dot_product_attention (an independent reference) over the shapes the blocking has edges at
(partial blocks, one block, groups of query heads, packed segments); it runs per shard on a mesh;
``auto`` picks it on CPU and the model's train step calls it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import arch_for, random_params
from jaxllama.model import cpu_kernels
from jaxllama.model.attention import attend, cpu_flash_attention, resolve_impl
from jaxllama.model.llama import Llama

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the native kernels")


def inputs(b, t, h, kv, d, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d))]


def packed(b, t, seed=0):
    """Documents of random lengths (some shorter than a 64-position block, some across blocks)."""
    r = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(r.choice(np.arange(1, t), size=min(4, t - 1), replace=False))
        seg[row] = np.searchsorted(cuts, np.arange(t), side="right") + 1
    return seg


def torch_reference(q, k, v, d_out, seg):
    """Output and (dq, dk, dv) from torch's SDPA with autograd; GQA by repeating K and V."""
    tq, tk, tv = (torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    qh = tq.transpose(1, 2)
    kh, vh = (x.repeat_interleave(g, dim=2).transpose(1, 2) for x in (tk, tv))
    t = q.shape[1]
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    if seg is not None:
        s = torch.tensor(np.asarray(seg))
        mask = mask & (s[:, None, :, None] == s[:, None, None, :])
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2)
    out.backward(torch.tensor(np.asarray(d_out), dtype=torch.float64))
    return [x.detach().numpy() for x in (out, tq.grad, tk.grad, tv.grad)]


def flash_and_grads(q, k, v, d_out, seg):
    out, vjp = jax.vjp(lambda q, k, v: cpu_kernels.flash_attention(q, k, v, seg), q, k, v)
    return [out, *vjp(d_out)]


@pytest.mark.parametrize("b,t,h,kv,d", [
    (2, 64, 4, 2, 16),     # one block
    (1, 100, 6, 2, 32),    # a partial second block
    (2, 200, 8, 8, 16),    # multi-head (group 1), four blocks, the last partial
    (1, 130, 20, 1, 16),   # multi-query: 20 query heads on one KV head
    (1, 1, 2, 1, 16),      # a single position
])
@pytest.mark.parametrize("with_segments", [False, True])
def test_flash_equals_torch_sdpa(b, t, h, kv, d, with_segments):
    q, k, v, d_out = inputs(b, t, h, kv, d)
    seg = jnp.asarray(packed(b, t)) if with_segments and t > 1 else None
    assert cpu_kernels.flash_supported(q, k)
    got = jax.jit(flash_and_grads)(q, k, v, d_out, seg)
    want = torch_reference(q, k, v, d_out, seg)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(x), y, atol=2e-5 * max(1.0, np.abs(y).max()), rtol=1e-4, err_msg=name)


def test_segments_not_in_order_and_isolated_positions():
    """Segment ids need not increase along the row (the block skipping works on ranges), and a
    position alone in its segment attends only to itself."""
    b, t, h, kv, d = 1, 150, 4, 2, 16
    q, k, v, d_out = inputs(b, t, h, kv, d, seed=1)
    seg = np.where(np.arange(t) % 3 == 0, 7, 2)[None].astype(np.int32)
    seg[0, 70] = 99  # alone
    got = jax.jit(flash_and_grads)(q, k, v, d_out, jnp.asarray(seg))
    want = torch_reference(q, k, v, d_out, seg)
    for x, y in zip(got, want):
        np.testing.assert_allclose(np.asarray(x), y, atol=2e-5 * max(1.0, np.abs(y).max()), rtol=1e-4)
    for head in (0, 1):  # the query heads of KV head 0
        np.testing.assert_allclose(np.asarray(got[0])[0, 70, head], np.asarray(v)[0, 70, 0], atol=1e-6)


def test_half_precision_inputs_run_in_float32():
    q, k, v, _ = inputs(1, 80, 4, 2, 16)
    got = cpu_kernels.flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), None)
    assert got.dtype == jnp.bfloat16
    want = torch_reference(*(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)), jnp.zeros_like(q), None)[0]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def test_unsupported_head_size_falls_back_to_the_reference():
    """A head size that is not a whole number of vectors runs the xla reference (same result)."""
    q, k, v, _ = inputs(1, 40, 2, 1, 4)
    assert not cpu_kernels.flash_supported(q, k)
    want = torch_reference(q, k, v, jnp.zeros_like(q), None)[0]
    np.testing.assert_allclose(np.asarray(cpu_flash_attention(q, k, v, None)), want, atol=2e-5)


def test_auto_is_cpu_flash_on_cpu_and_the_train_forward_calls_it():
    assert resolve_impl("auto") == "cpu_flash"
    a = arch_for()
    assert a.attention == "cpu_flash"
    params = random_params(a)
    tokens = np.random.default_rng(0).integers(0, a.vocab_size, (2, 64))

    def loss(p, model):
        return jnp.mean(model.apply({"params": p}, tokens) ** 2)

    text = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, Llama(a)))
    assert "jaxllama_flash_forward" in text and "jaxllama_flash_backward" in text
    ref = dataclasses.replace(a, attention="xla")
    assert "jaxllama_flash" not in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, Llama(ref)))
    got = jax.grad(loss)(params, Llama(a))
    want = jax.grad(loss)(params, Llama(ref))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4)


def test_per_shard_on_a_mesh_equals_unsharded():
    """On a data=2 x fsdp=2 x tensor=2 mesh the kernel runs once per shard (rows over data x fsdp,
    heads over tensor); the model's logits and gradients equal the unsharded reference's."""
    from jaxllama.config import load_config
    from jaxllama.program import build_program

    cfg = load_config(None, ["model.preset=debug", "data.seq_len=96", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    layout = build_program(cfg).layout
    a = arch_for()
    params = random_params(a)
    tokens = np.random.default_rng(2).integers(0, a.vocab_size, (4, 96))
    seg = np.repeat([[1] * 40 + [2] * 56], 4, 0)

    def loss(p, model):
        return jnp.mean(jnp.tanh(model.apply({"params": p}, tokens, None, seg)))

    sharded = Llama(a, layout)
    text = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, sharded))
    assert "shard_map" in text and "jaxllama_flash_forward" in text
    got = jax.jit(jax.grad(loss), static_argnums=1)(params, sharded)
    want = jax.grad(loss)(params, Llama(dataclasses.replace(a, attention="xla")))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4)


def test_attend_dispatches_cpu_flash():
    q, k, v, _ = inputs(2, 70, 4, 2, 16)
    seg = jnp.asarray(packed(2, 70))
    want = torch_reference(q, k, v, jnp.zeros_like(q), seg)[0]
    np.testing.assert_allclose(np.asarray(attend("cpu_flash", q, k, v, seg)), want, atol=2e-5)
