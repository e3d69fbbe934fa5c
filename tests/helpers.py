"""Small shared helpers for tests (random models with O(1) activations, configs)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.config import load_config
from jaxllama.model.llama import Arch, Llama


# Architecture variants every parity test covers: multi-head, grouped-query, tied embeddings, Llama 3.1 RoPE.
ARCH_CASES = {
    "mha": ["model.n_heads=4", "model.n_kv_heads=4"],
    "gqa": ["model.n_heads=8", "model.n_kv_heads=2", "model.head_dim=16"],
    "tied": ["model.tie_embeddings=true"],
    "llama3_rope": ["model.rope_type=llama3", "model.rope_factor=8", "model.rope_low_freq_factor=1",
                    "model.rope_high_freq_factor=4", "model.rope_original_max_position=64",
                    "model.rope_theta=500000"],
}


def arch_for(*overrides: str) -> Arch:
    cfg = load_config(None, ["model.preset=debug", "data.seq_len=32", *overrides])
    return Arch.from_config(cfg.model)


def flat_arrays(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """A parameter tree as {"layers/mlp/gate_proj/kernel": numpy array, ...}, to compare trees leaf by leaf."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_arrays(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def packed_segments(batches):
    """Yields (row, mask) for every packed segment of every row of every batch, in order.

    ``row`` maps each batch key to that row's array; ``mask`` selects the segment's positions.
    """
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            row = {k: v[r] for k, v in b.items()}
            for s in range(1, int(row["segment_ids"].max(initial=0)) + 1):
                yield row, row["segment_ids"] == s


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
