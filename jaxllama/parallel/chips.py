"""Accelerator chips: the one owner of their peak FLOP/s, HBM size and HBM bandwidth, and of TPU slice names.

The figures are the vendors' published per-chip numbers (dense bf16 matmul peak; HBM capacity and
bandwidth). MFU (:mod:`jaxllama.train.metrics`) divides by ``peak_flops``; ``jaxllama compile-check
--target`` compares the compiler's peak memory with ``hbm_bytes`` and takes the roofline time as
max(FLOPs / ``peak_flops``, bytes / ``hbm_bandwidth``).

TPU slices are named by *TensorCores* (``v5p-64``: 64 cores = 32 chips, two cores per chip on v4 and
v5p) or by chips (``v5e-256``, ``v6e-8``: one core per chip), as Google Cloud names them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from jaxllama.errors import ConfigError

GB, GIB = 10**9, 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    kind: str  # matched (case-insensitively, as a substring) against jax's ``device_kind``
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    cores_per_chip: int = 1  # TPU only: cores counted in the slice name
    torus_dims: int = 0  # TPU only: 3 (v4, v5p) or 2 (v5e, v6e)


# First match wins (the more specific device_kind first).
CHIPS = (
    Chip("H200", "H200", 989e12, 141 * GB, 4.8e12),
    Chip("H100", "H100", 989e12, 80 * GB, 3.35e12),
    Chip("A100", "A100", 312e12, 80 * GB, 2.039e12),
    Chip("L4", "L4", 121e12, 24 * GB, 300e9),
    Chip("A10", "A10", 125e12, 24 * GB, 600e9),
    Chip("v6e", "TPU v6", 918e12, 32 * GIB, 1640e9, 1, 2),
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 1, 2),
    Chip("v5e", "TPU v5e", 197e12, 16 * GIB, 819e9, 1, 2),
    Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 2, 3),
    Chip("v4", "TPU v4", 275e12, 32 * GIB, 1228e9, 2, 3),
    Chip("v3", "TPU v3", 123e12, 32 * GIB, 900e9, 2, 2),
)
TPU_TARGETS = ("v4", "v5e", "v5p", "v6e")


def chip_for(device_kind: str) -> Chip | None:
    """The chip whose ``kind`` names ``device_kind`` (jax's ``device.device_kind``), or None."""
    for chip in CHIPS:
        if chip.kind.lower() in device_kind.lower():
            return chip
    return None


@dataclass(frozen=True)
class TpuTarget:
    """A TPU slice by its Cloud name (``v5p-64``), resolved to chips and a physical topology."""

    name: str
    chip: Chip
    chips: int
    topology: str  # e.g. "v5p:2x4x4" (what jax.experimental.topologies takes)
    host_bounds: tuple[int, int, int]  # chips per host

    @classmethod
    def parse(cls, text: str, key: str = "--target") -> "TpuTarget":
        m = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", text.strip().lower())
        if not m:
            raise ConfigError(f"{key}: expected a TPU slice such as v5p-64, v5e-256, v6e-8 or v4-32 (one of "
                              f"{', '.join(TPU_TARGETS)} then -cores), got {text!r}")
        gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        chip = next(c for c in CHIPS if c.name == gen)
        cores = int(m.group(2))
        chips, rem = divmod(cores, chip.cores_per_chip)
        if rem or chips < 1 or chips & (chips - 1):
            raise ConfigError(f"{key}: {text}: {gen} slices have a power-of-two number of chips "
                              f"({chip.cores_per_chip} core(s) each), e.g. {gen}-{8 * chip.cores_per_chip}")
        dims = _torus(chips, chip.torus_dims)
        if chip.torus_dims == 3:
            bounds = (min(2, dims[0]), min(2, dims[1]), 1)
        else:
            bounds = (min(2, dims[0]), min(4, dims[1]), 1)
        return cls(f"{gen}-{cores}", chip, chips, f"{gen}:{'x'.join(map(str, dims))}", bounds)


def _torus(chips: int, ndim: int) -> tuple[int, ...]:
    """The slice shape Google Cloud gives ``chips`` chips: powers of two, as even as possible,
    ascending (v5p-64 -> 2x4x4, v5e-256 -> 16x16, v6e-8 -> 2x4; 3D slices start from 2x2x1)."""
    if ndim == 3 and chips < 8:
        return {1: (1, 1, 1), 2: (1, 1, 2), 4: (2, 2, 1)}[chips]
    log = int(math.log2(chips))
    dims = [log // ndim + (1 if i >= ndim - log % ndim else 0) for i in range(ndim)]
    return tuple(2**d for d in dims)


def check_libtpu() -> None:
    """One line naming the install command when the TPU compiler is missing."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("--target: compiling for a TPU needs the TPU compiler (libtpu); install it with "
                          "pip install -e '.[tpu]'")


def target_devices(target: TpuTarget, slices: int = 1) -> list:
    """The devices of ``slices`` x ``target`` from the TPU compiler (libtpu), with no TPU present."""
    check_libtpu()
    from jax.experimental import topologies

    if slices < 1:
        raise ConfigError(f"--slices: must be >= 1, got {slices}")
    # libtpu reads these when it loads. With no TPU present it would otherwise warn, probe the
    # network for TPU metadata, and hold a lock that lets one process at a time compile for TPUs.
    for key, value in dict(TPU_ACCELERATOR_TYPE=target.name, TPU_WORKER_HOSTNAMES="localhost",
                           TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1").items():
        os.environ.setdefault(key, value)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, chip_config_name="default",
                                        chips_per_host_bounds=target.host_bounds, num_slices=slices)
    return list(desc.devices)
