"""The inference mesh and parameter placement: ``--mesh data=1,tensor=4`` -> a Layout, params in shards.

Inference uses the training code's logical rules unchanged (``jaxllama.config.DEFAULT_RULES``):
kv heads, heads, mlp and vocab over ``tensor``, batch over ``data`` (and ``fsdp``, which is 1 here
unless asked for). The mesh takes the first data x fsdp x tensor devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxllama.config import DEFAULT_RULES, indivisible_dim
from jaxllama.errors import ConfigError
from jaxllama.model.llama import Arch, Llama
from jaxllama.parallel.sharding import Layout, rules_from_config

AXES = ("data", "fsdp", "tensor")


def parse_mesh(text: str | None) -> dict[str, int]:
    """``"data=1,tensor=4"`` -> sizes for data, fsdp, tensor (unnamed axes are 1; None -> auto)."""
    sizes = {a: 1 for a in AXES}
    if not text:
        return {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in AXES:
            raise ConfigError(f"--mesh: expected comma-separated axis=size with axes {', '.join(AXES)}, got {text!r}")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh: {key}={value!r} is not an integer") from None
        if sizes[key] < 1:
            raise ConfigError(f"--mesh: {key} must be >= 1, got {sizes[key]}")
    return sizes


def _divisible(a: Arch, tp: int) -> bool:
    return all(getattr(a, k) % tp == 0 for k in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"))


def auto_mesh(a: Arch, n_devices: int) -> dict[str, int]:
    """No ``--mesh``: the widest tensor split of the available devices that the model's shapes allow."""
    tp = max(t for t in range(1, n_devices + 1) if n_devices % t == 0 and _divisible(a, t))
    return {"data": 1, "fsdp": 1, "tensor": tp}


def inference_layout(a: Arch, sizes: dict[str, int] | None = None, devices: list | None = None) -> Layout:
    """A Layout over the first data x fsdp x tensor devices, checked against the model's shapes."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = sizes or auto_mesh(a, len(devices))
    n = int(np.prod([sizes[k] for k in AXES]))
    if n > len(devices):
        raise ConfigError(f"--mesh: {'x'.join(str(sizes[k]) for k in AXES)} = {n} devices, but only "
                          f"{len(devices)} are available")
    bad = indivisible_dim(a, sizes)
    if bad:
        key, size, axis, axis_size = bad
        raise ConfigError(f"--mesh: {axis}={axis_size} does not divide the model's {key}={size}")
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(f"--mesh: with {jax.process_count()} processes the mesh must use all {len(devices)} "
                          f"devices, got {n}")
    grid = np.asarray(devices[:n], dtype=object).reshape(tuple(sizes[k] for k in AXES))
    mesh = Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return Layout(mesh, rules_from_config(DEFAULT_RULES))


def inference_arch(a: Arch, dtype: str | None = None, scan_layers: bool | None = None) -> Arch:
    """The model for serving: compute and parameters both in ``dtype`` (default: the arch's compute dtype).

    ``scan_layers=False`` (what ``generate`` uses, as MaxText does for decoding) unrolls the layers:
    each layer then has its own cache buffers, updated in place by the decode loop, and no loop over
    layers runs inside the loop over tokens (2x faster batch-1 decoding on CPU). Params must then be
    in the unrolled tree (:func:`jaxllama.model.llama.unstack_layers`).
    """
    dtype = dtype or a.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype: {dtype!r} is not one of float32, bfloat16, float16")
    scan = a.scan_layers if scan_layers is None else scan_layers
    return dataclasses.replace(a, dtype=dtype, param_dtype=dtype, remat="none", scan_layers=scan)


def param_shardings(a: Arch, layout: Layout) -> Any:
    """NamedShardings for the canonical tree, from the model's logical axis names."""
    boxed = jax.eval_shape(lambda: Llama(a).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    return layout.tree_shardings(boxed)


def place_params(params: Any, a: Arch, layout: Layout) -> Any:
    """Cast to ``a.param_dtype`` and put each leaf in its shards, one leaf at a time.

    Host arrays go through ``make_array_from_callback``: each process copies only the slices its own
    devices hold, which also works when the mesh spans several processes.
    """
    dtype = jnp.dtype(a.param_dtype)
    if layout.mesh is None:
        return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    shardings = param_shardings(a, layout)
    if jax.tree.structure(params) != jax.tree.structure(shardings):
        raise ConfigError("parameters do not match the model's tree (a checkpoint of another architecture?)")

    def put(x, sharding):
        if isinstance(x, jax.Array):
            return jax.device_put(x.astype(dtype), sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx].astype(dtype))

    return jax.tree.map(put, params, shardings)
