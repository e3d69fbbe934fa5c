"""The device mesh: the one owner of the axis names (``data``, ``fsdp``, ``tensor``) and their sizes.

A :class:`MeshPlan` resolves the configured sizes (one may be -1: fill; each axis = DCN x ICI) for a
number of devices, then builds a :class:`~jax.sharding.Mesh` over devices (real, simulated, a TPU
topology's) or an :class:`~jax.sharding.AbstractMesh` (sizes only). Nothing else computes mesh sizes.

We build the mesh with *Auto* axis types: shardings of parameters, batches and activations are
stated explicitly (``out_shardings``, ``with_sharding_constraint``) and XLA's partitioner fills in
the rest. ``jax.make_mesh``'s newer default, *Explicit* axes (sharding in types), would make every
op's output sharding part of its type and require annotating reshapes in model code; that buys
nothing here and would put mesh concerns into the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

from jaxllama.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class MeshPlan:
    """Resolved sizes per axis: ``ici`` within a slice, ``dcn`` across slices; totals are their product."""

    ici: tuple[int, int, int]
    dcn: tuple[int, int, int] = (1, 1, 1)

    @classmethod
    def resolve(cls, mesh_cfg: Any, n_devices: int, key: str = "mesh") -> "MeshPlan":
        """From ``mesh.{data,fsdp,tensor,dcn_*}`` (a MeshConfig) for ``n_devices``, resolving -1."""
        if n_devices < 1:
            raise ConfigError(f"--devices: must be a positive number of devices, got {n_devices}")
        dcn = tuple(getattr(mesh_cfg, f"dcn_{a}", 1) for a in AXES)
        n_dcn = math.prod(dcn)
        if n_devices % n_dcn:
            raise ConfigError(f"{key}: dcn sizes {dict(zip(AXES, dcn))} (product {n_dcn}) do not divide the "
                              f"{n_devices} devices")
        per_slice = n_devices // n_dcn
        ici = {a: getattr(mesh_cfg, a) for a in AXES}
        known = math.prod(v for v in ici.values() if v != -1)
        desc = " x ".join(f"{k}={v}" for k, v in ici.items())
        if -1 in ici.values():
            if per_slice % known:
                raise ConfigError(f"{key}: {desc} cannot fill {per_slice} devices per slice ({known} does not "
                                  "divide it)")
            ici = {k: (per_slice // known if v == -1 else v) for k, v in ici.items()}
        elif known != per_slice:
            raise ConfigError(f"{key}: {desc} = {known} devices, but {per_slice} are available"
                              f"{' per slice' if n_dcn > 1 else ''}; make the product match or set one size to -1")
        return cls(tuple(ici[a] for a in AXES), dcn)

    @property
    def shape(self) -> dict[str, int]:
        """Total size of each axis (DCN x ICI), in axis order."""
        return {a: i * d for a, i, d in zip(AXES, self.ici, self.dcn)}

    @property
    def size(self) -> int:
        return math.prod(self.shape.values())

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.shape.items())

    def abstract(self) -> AbstractMesh:
        """Sizes and names only: shardings and shard shapes for devices that need not exist."""
        return AbstractMesh(tuple(self.shape.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES))

    def build(self, devices: list) -> Mesh:
        """A mesh over exactly ``self.size`` devices (a topology-aware grid where JAX knows one)."""
        devices = list(devices)
        if len(devices) != self.size:
            raise ConfigError(f"mesh: {self.describe()} needs {self.size} devices, got {len(devices)}")
        shape = tuple(self.shape.values())
        if math.prod(self.dcn) > 1:
            try:
                grid = mesh_utils.create_hybrid_device_mesh(self.ici, self.dcn, devices=devices,
                                                            allow_split_physical_axes=True)
            except (ValueError, AttributeError) as e:
                # Simulated devices (CPU tests) have no slice_index: lay slices out in device order.
                if all(getattr(d, "slice_index", None) is not None for d in devices):
                    raise ConfigError(f"mesh: cannot build a {self.dcn} x {self.ici} multi-slice mesh: {e}") from None
                grid = _hybrid_by_order(devices, self.ici, self.dcn)
        else:
            try:
                grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
            except (ValueError, AssertionError, NotImplementedError):
                grid = np.asarray(devices, dtype=object).reshape(shape)
        return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_platform(mesh: Any) -> str | None:
    """The platform a program on ``mesh`` compiles for (``cpu``, ``gpu``, ``tpu``): its devices'
    (a TPU topology's may differ from this process's backend); None for an abstract mesh or none."""
    return mesh.devices.flat[0].platform if isinstance(mesh, Mesh) else None


def parse_mesh(text: str | None, key: str = "--mesh") -> dict[str, int]:
    """``"data=1,tensor=4"`` -> sizes for every axis (unnamed axes are 1); empty/None -> {} (choose)."""
    if not text:
        return {}
    sizes = {a: 1 for a in AXES}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in AXES:
            raise ConfigError(f"{key}: expected comma-separated axis=size with axes {', '.join(AXES)}, got {text!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"{key}: {name}={value!r} is not an integer") from None
        if sizes[name] < 1:
            raise ConfigError(f"{key}: {name} must be >= 1, got {sizes[name]}")
    return sizes


def _hybrid_by_order(devices: list, ici: tuple[int, ...], dcn: tuple[int, ...]) -> np.ndarray:
    """Consecutive device blocks are slices; each mesh axis is (dcn, ici) with dcn outermost."""
    per_slice = math.prod(ici)
    slices = [np.asarray(devices[i * per_slice:(i + 1) * per_slice], dtype=object).reshape(ici)
              for i in range(math.prod(dcn))]
    grid = np.asarray(slices, dtype=object).reshape(dcn + ici)  # [d0, d1, d2, i0, i1, i2]
    grid = grid.transpose(0, 3, 1, 4, 2, 5)
    return grid.reshape(tuple(d * i for d, i in zip(dcn, ici)))
