"""The device mesh (``data``, ``fsdp``, ``tensor``), single- or multi-slice.

We build the mesh with *Auto* axis types: shardings of parameters, batches and activations are
stated explicitly (``out_shardings``, ``with_sharding_constraint``) and XLA's partitioner fills in
the rest. ``jax.make_mesh``'s newer default, *Explicit* axes (sharding in types), would make every
op's output sharding part of its type and require annotating reshapes in model code; that buys
nothing here and would put mesh concerns into the model.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxllama.config import Config, validate_mesh
from jaxllama.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def make_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) sized by ``cfg.mesh``; validates sizes first."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = validate_mesh(cfg, len(devices))
    dcn = tuple(getattr(cfg.mesh, f"dcn_{a}") for a in AXES)
    shape = tuple(sizes[a] for a in AXES)
    if np.prod(dcn) > 1:
        ici = tuple(s // d for s, d in zip(shape, dcn))
        try:
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                                        allow_split_physical_axes=True)
        except (ValueError, AttributeError) as e:
            # Simulated devices (CPU tests) have no slice_index: lay slices out in device order.
            if all(getattr(d, "slice_index", None) is not None for d in devices):
                raise ConfigError(f"mesh: cannot build a {dcn} x {ici} multi-slice mesh: {e}") from None
            grid = _hybrid_by_order(devices, ici, dcn)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
        except (ValueError, AssertionError, NotImplementedError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _hybrid_by_order(devices: list, ici: tuple[int, ...], dcn: tuple[int, ...]) -> np.ndarray:
    """Consecutive device blocks are slices; each mesh axis is (dcn, ici) with dcn outermost."""
    per_slice = int(np.prod(ici))
    slices = [np.asarray(devices[i * per_slice:(i + 1) * per_slice]).reshape(ici)
              for i in range(int(np.prod(dcn)))]
    grid = np.asarray(slices, dtype=object).reshape(dcn + ici)  # [d0, d1, d2, i0, i1, i2]
    grid = grid.transpose(0, 3, 1, 4, 2, 5)
    return grid.reshape(tuple(d * i for d, i in zip(dcn, ici)))
