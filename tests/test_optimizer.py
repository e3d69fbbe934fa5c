"""Schedules and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.config import OptimConfig
from jaxllama.program.optimizer import decay_mask, make_optimizer, make_schedule


def lrs(o, steps):
    s = make_schedule(o, steps)
    return np.array([float(s(i)) for i in range(steps)])


def test_cosine_warms_up_then_decays_to_the_floor():
    v = lrs(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"), 100)
    np.testing.assert_allclose(v[[0, 9]], [0.1, 1.0], rtol=1e-6)  # the first step already learns
    assert np.all(np.diff(v[:10]) > 0) and np.all(np.diff(v[10:]) <= 1e-7)
    np.testing.assert_allclose(v[-1], 0.1, atol=1e-3)


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    v = lrs(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2), 100)
    assert np.all(v[10:80] == 1.0)
    assert np.all(np.diff(v[80:]) < 0) and v[-1] == 0.0


def test_constant_after_warmup():
    v = lrs(OptimConfig(lr=0.5, warmup_steps=4, schedule="constant"), 20)
    assert np.all(v[3:] == 0.5) and v[0] < 0.5


def test_weight_decay_spares_norm_scales():
    params = {"norm": {"scale": jnp.ones(4)}, "layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 4, 4))}},
                                                          "input_layernorm": {"scale": jnp.ones((2, 4))}},
              "embed_tokens": {"embedding": jnp.ones((8, 4))}}
    mask = decay_mask(params)
    assert mask["norm"]["scale"] is False and mask["layers"]["input_layernorm"]["scale"] is False
    assert mask["layers"]["mlp"]["up_proj"]["kernel"] is True and mask["embed_tokens"]["embedding"] is True
    # and the optimizer honours it: with zero gradients only decayed leaves move
    tx, _ = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, clip_norm=1.0), 10)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["layers"]["mlp"]["up_proj"]["kernel"]).max()) > 0.0
