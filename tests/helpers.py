"""Small shared helpers for tests (random models with O(1) activations, configs)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.config import load_config
from jaxllama.model.llama import Arch, Llama


def arch_for(*overrides: str) -> Arch:
    cfg = load_config(None, ["model.preset=debug", "data.seq_len=32", *overrides])
    return Arch.from_config(cfg.model)


def random_params(a: Arch, seed: int = 0) -> dict:
    """Parameters with O(1) activations (init's 0.02 std would make any two models look alike)."""
    shapes = nn.unbox(jax.eval_shape(lambda: Llama(a).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "scale":
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = leaf.shape[-1] if name == "embedding" else leaf.shape[-2]
        std = 1.0 if name == "embedding" else 1.0 / np.sqrt(fan_in)
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)
