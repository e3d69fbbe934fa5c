"""Train-step building blocks: scan vs unrolled, remat, gradient accumulation, chunked loss, NaN skip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import arch_for, random_params
from jaxllama.data.synthetic import SyntheticSource
from jaxllama.model.llama import Llama, stack_layers, unstack_layers
from jaxllama.program.step import TrainState, chunked_cross_entropy, loss_chunk_size, make_loss_fn, make_train_step


def batch_for(a, b=8, t=32, seed=0):
    return {k: jnp.asarray(v) for k, v in SyntheticSource(a.vocab_size, t, b, seed=seed).batch(0).items()}


def grads_of(a, params, batch):
    loss_fn = make_loss_fn(Llama(a), a, batch["tokens"].shape[1])
    return jax.grad(lambda p: loss_fn(p, batch)[0])(params)


def test_scanned_and_unrolled_layers_agree():
    a = arch_for()
    params = random_params(a)
    unrolled_a = dataclasses.replace(a, scan_layers=False)
    flat = unstack_layers(params, a.n_layers)
    tokens = batch_for(a)["tokens"]
    np.testing.assert_allclose(Llama(unrolled_a).apply({"params": flat}, tokens),
                               Llama(a).apply({"params": params}, tokens), atol=1e-5)
    g_scan = grads_of(a, params, batch_for(a))
    g_unrolled = stack_layers(grads_of(unrolled_a, flat, batch_for(a)), a.n_layers)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), g_scan, g_unrolled)
    # and the unrolled model really has one module per layer
    init = Llama(unrolled_a).init(jax.random.key(0), tokens[:1])["params"]
    assert {f"layers_{i}" for i in range(a.n_layers)} <= set(init)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_does_not_change_gradients(policy):
    a = arch_for()
    params = random_params(a)
    ref = grads_of(a, params, batch_for(a))
    remat_a = dataclasses.replace(a, remat=policy)
    got = grads_of(remat_a, params, batch_for(a))

    def remats(arch):  # the loss itself remats its chunks; the policy must add the blocks' remat
        loss_fn = make_loss_fn(Llama(arch), arch, 32)
        return str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, batch_for(a))[0]))(params)).count("remat2")

    assert remats(remat_a) > remats(a)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5), ref, got)


def run_step(a, params, batch, grad_accum):
    # plain SGD with lr 1: the parameter change is the gradient itself (Adam's normalization would
    # amplify float noise where a gradient is near zero)
    tx = optax.sgd(1.0)
    step = make_train_step(make_loss_fn(Llama(a), a, batch["tokens"].shape[1]), tx, lambda s: 1.0, grad_accum)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    return jax.jit(step)(state, batch)


def test_gradient_accumulation_equals_one_big_batch():
    a = arch_for()
    params = random_params(a)
    batch = batch_for(a)
    batch["loss_mask"] = batch["loss_mask"].at[1, 20:].set(0.0).at[6, :5].set(0.0)  # unequal token counts
    s1, m1 = run_step(a, params, batch, 1)
    s4, m4 = run_step(a, params, batch, 4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert float(m4["tokens"]) == float(m1["tokens"]) == 8 * 32 - 12 - 5
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), s4.params, s1.params)


def test_nonfinite_loss_skips_the_update():
    a = arch_for()
    params = random_params(a)
    batch = batch_for(a)
    batch["loss_mask"] = batch["loss_mask"].at[0, 0].set(jnp.nan)
    state, m = run_step(a, params, batch, 1)
    assert int(m["finite"]) == 0 and not np.isfinite(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, state.params, params)
    assert int(state.step) == 1


@pytest.mark.parametrize("chunk", [1, 8, 32])
def test_chunked_cross_entropy_matches_full_logits(chunk):
    r = np.random.default_rng(0)
    h = jnp.asarray(r.standard_normal((4, 32, 16)), jnp.float32)
    w = jnp.asarray(r.standard_normal((16, 50)), jnp.float32)
    tgt = jnp.asarray(r.integers(0, 50, (4, 32)))
    mask = jnp.asarray(r.random((4, 32)) > 0.2, jnp.float32)

    def full(h, w):
        logits = h @ w
        lse = jax.nn.logsumexp(logits, -1)
        nll = lse - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) + 0.1 * jnp.sum(lse**2 * mask)

    def chunked(h, w):
        nll, z = chunked_cross_entropy(h, w, tgt, mask, chunk, jnp.float32)
        return nll + 0.1 * z

    np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-5)
    for g1, g2 in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(full, (0, 1))(h, w)):
        np.testing.assert_allclose(g1, g2, atol=1e-4)


@pytest.mark.parametrize("chunk", [8, 32])
def test_cross_entropy_and_its_gradients_equal_torch(chunk):
    """The loss's own backward (one pass: softmax - onehot) against PyTorch's autograd of
    ``F.cross_entropy`` plus the z-loss term, both gradients (hidden states and head kernel)."""
    import torch

    r = np.random.default_rng(1)
    h, w = r.standard_normal((3, 32, 16)).astype(np.float32), r.standard_normal((16, 70)).astype(np.float32)
    tgt, mask = r.integers(0, 70, (3, 32)), (r.random((3, 32)) > 0.3).astype(np.float32)

    def ours(h, w):
        nll, z = chunked_cross_entropy(h, w, jnp.asarray(tgt), jnp.asarray(mask), chunk, jnp.float32)
        return nll + 0.25 * z

    th, tw = torch.tensor(h, requires_grad=True), torch.tensor(w, requires_grad=True)
    logits = (th @ tw).reshape(-1, 70)
    tm = torch.tensor(mask).reshape(-1)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tgt).reshape(-1), reduction="none")
    theirs = (nll * tm).sum() + 0.25 * (torch.logsumexp(logits, -1) ** 2 * tm).sum()
    theirs.backward()
    value, grads = jax.value_and_grad(ours, (0, 1))(jnp.asarray(h), jnp.asarray(w))
    np.testing.assert_allclose(value, theirs.item(), rtol=1e-5)
    np.testing.assert_allclose(grads[0], th.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1], tw.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_loss_chunk_never_builds_full_logits_for_big_vocabularies():
    assert loss_chunk_size(4096, 128256) == 128  # 128 x 128256 floats per row, not 4096 x 128256
    assert loss_chunk_size(128, 2048) == 128
    assert loss_chunk_size(96, 50, requested=64) == 48
