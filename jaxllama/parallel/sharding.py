"""Logical axis names -> mesh shardings, for parameters, optimizer state, batches and activations.

The model only ever names *logical* axes. Weights use ``embed, heads, kv_heads, head_dim, mlp,
vocab, layers``; activations (and the batch, and the KV cache) use their own ``activation_*``
names (MaxText's convention), so a rule for a weight's ``embed`` can never change how the residual
stream is laid out, whatever order the rules come in. An ``activation_X`` without a rule of its own
follows ``X``'s rule (``[kv_heads, null]`` replicates the KV heads' weights, activations and cache
alike), except ``activation_embed``, which stays whole unless a rule says otherwise: the weights'
``embed -> fsdp`` split is a storage choice, not a compute one.

A :class:`Layout` (mesh + rules from ``mesh.rules``) turns names into ``NamedSharding``s, and
:func:`check_divisible` refuses, in one line, the first array dimension a layout cannot split
evenly. This file is the whole sharding story.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxllama.errors import ConfigError

ACTIVATION = "activation_"
BATCH_AXES = ("activation_batch", "activation_length")  # a [batch, seq_len] input array
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")
# Activation names that do not follow their weight name's rule unless a rule names them.
_ACTIVATION_DEFAULTS = {"activation_embed": None}
_WEIGHT_NAMES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")
LOGICAL_NAMES = _WEIGHT_NAMES + ("layers",) + tuple(ACTIVATION + n for n in _WEIGHT_NAMES)  # what a rule may name


def rules_from_config(rules: list) -> tuple[tuple[str, Any], ...]:
    """``[["batch", ["data", "fsdp"]], ...]`` (YAML) -> hashable Flax rules, with the ``activation_*``
    rules derived from the weight rules where none is given (see the module docstring)."""
    out = [(name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules]
    named = {name for name, _ in out}
    for base in _WEIGHT_NAMES:
        act = ACTIVATION + base
        if act in named:
            continue
        if act in _ACTIVATION_DEFAULTS:
            out.append((act, _ACTIVATION_DEFAULTS[act]))
        else:
            out += [(act, axes) for name, axes in out if name == base]
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """A mesh (real or abstract) plus logical-axis rules. ``mesh=None``: unsharded (constraints are no-ops)."""

    mesh: Any
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

    def shards(self, name: str) -> int:
        """Into how many pieces ``name`` is split (1 when replicated or unsharded)."""
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in axis_tuple(self.mesh_axes(name)))

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


def axis_tuple(axes: Any) -> tuple[str, ...]:
    """A PartitionSpec entry (None, a mesh axis, or a tuple of them) as a tuple of mesh axes."""
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def boxed_shapes(boxed_abstract: Any) -> list[tuple[str, tuple[int, ...], tuple[str | None, ...]]]:
    """``(path, shape, logical names)`` of every leaf of a boxed abstract tree, e.g.
    ``("layers/self_attn/k_proj/kernel", (4, 256, 128), ("layers", "embed", "kv_heads"))``."""
    leaves = jax.tree_util.tree_flatten_with_path(boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    out = []
    for path, box in leaves:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        value = box.unbox() if isinstance(box, nn.Partitioned) else box
        names = tuple(box.names) if isinstance(box, nn.Partitioned) else (None,) * len(value.shape)
        out.append((name, tuple(value.shape), names))
    return out


class ShardError(ConfigError):
    """A dimension a layout splits unevenly; the fields let a caller phrase it for its own flags."""

    def __init__(self, message: str, name: str, size: int, axes: tuple[str, ...], n: int):
        super().__init__(message)
        self.name, self.size, self.axes, self.n = name, size, axes, n


def check_divisible(layout: Layout, arrays: Iterable[tuple[str, tuple[int, ...], tuple[str | None, ...]]]) -> None:
    """One-line ConfigError for the first dimension the layout splits unevenly, naming the array, its
    logical axis, the mesh axes and the sizes: ``layers/self_attn/k_proj/kernel: kv_heads=512 over
    tensor=3 does not divide``. Whatever the rules are, built-in or custom, this is the check."""
    for name, shape, names in arrays:
        for size, logical, entry in zip(shape, names, layout.spec(names)):
            axes = axis_tuple(entry)
            n = math.prod(layout.mesh.shape[a] for a in axes)
            if size % n:
                mesh = ", ".join(f"{k}={v}" for k, v in layout.mesh.shape.items())
                raise ShardError(f"{name}: {logical}={size} over {' x '.join(axes)}={n} does not divide (mesh {mesh}); "
                                 f"change mesh.rules for {logical.removeprefix(ACTIVATION)} or the mesh sizes",
                                 name, size, axes, n)


def place(tree: Any, shardings: Any, dtype: Any, keep: tuple[str, ...] = ()) -> Any:
    """Arrays (host or device) -> their shards, cast to ``dtype``, one leaf at a time. Host arrays go
    through ``make_array_from_callback``: each process copies only the slices its own devices hold,
    so no device ever holds a full copy, and a mesh may span several processes. Leaves named in
    ``keep`` (quantized values and their scales) keep their own dtypes."""
    def put(path, x, sharding):
        dt = x.dtype if getattr(path[-1], "key", None) in keep else dtype
        if isinstance(x, jax.Array):
            return jax.device_put(x.astype(dt), sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx].astype(dt))

    return jax.tree_util.tree_map_with_path(put, tree, shardings)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, param_shardings: Any,
                        replicated: NamedSharding) -> Any:
    """Optimizer moments take their parameter's sharding; counters and scalars are replicated."""
    return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated)


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes one device holds for ``abstract_tree`` laid out by ``shardings`` (largest shard)."""
    return sum(math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))
