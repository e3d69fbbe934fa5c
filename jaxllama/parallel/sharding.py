"""Logical axis names -> mesh shardings, for parameters, optimizer state, batches and activations.

The model only ever names *logical* axes (``batch, length, embed, heads, kv_heads, head_dim, mlp,
vocab, layers``). A :class:`Layout` (mesh + rules from ``mesh.rules``) turns those names into
``NamedSharding``s; this file is the whole sharding story.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("batch", "length")


def rules_from_config(rules: list) -> tuple[tuple[str, Any], ...]:
    """``[["batch", ["data", "fsdp"]], ...]`` (YAML) -> hashable Flax rules."""
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """A mesh plus logical-axis rules. ``mesh=None`` means unsharded (constraints are no-ops)."""

    mesh: Mesh | None
    rules: tuple[tuple[str, Any], ...] = ()

    def spec(self, names: tuple[str | None, ...]) -> PartitionSpec:
        return nn.logical_to_mesh_axes(names, self.rules)

    def sharding(self, names: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))

    def constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(names))

    def mesh_axes(self, name: str) -> Any:
        """The mesh axes one logical name maps to (None: replicated)."""
        return self.spec((name,))[0]

    # -- trees ---------------------------------------------------------------------------------

    def tree_shardings(self, boxed_abstract: Any) -> Any:
        """Shardings for a tree whose leaves are ``nn.LogicallyPartitioned`` boxes (from eval_shape)."""
        specs = nn.get_partition_spec(boxed_abstract)
        return jax.tree.map(lambda s: NamedSharding(self.mesh, nn.logical_to_mesh_axes(tuple(s), self.rules)),
                            nn.unbox(specs), is_leaf=lambda x: isinstance(x, PartitionSpec))

    def batch_sharding(self) -> NamedSharding:
        return self.sharding(BATCH_AXES)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, param_shardings: Any,
                        replicated: NamedSharding) -> Any:
    """Optimizer moments take their parameter's sharding; counters and scalars are replicated."""
    return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated)


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes one device holds for ``abstract_tree`` laid out by ``shardings`` (largest shard)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shape = sharding.shard_shape(leaf.shape)
        n = 1
        for s in shape:
            n *= s
        total += n * leaf.dtype.itemsize
    return total
