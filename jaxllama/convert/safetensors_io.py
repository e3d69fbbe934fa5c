"""Minimal safetensors reading and streaming writing with numpy (bfloat16 via ml_dtypes).

Written here rather than taken from ``safetensors.numpy`` for two reasons: that module cannot
hold bfloat16, and its writer needs every tensor of a file in memory at once. The format is a
little-endian u64 header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the
raw bytes; knowing all shapes up front lets us write the header first and the tensors one by one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from jaxllama.convert.common import BF16
from jaxllama.errors import ConfigError

_CODES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16, "F64": np.dtype("<f8"),
          "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
          "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_NAMES = {v: k for k, v in _CODES.items()}


class SafetensorsFile:
    """Lazy, memory-mapped reader: ``get(name)`` maps just that tensor's bytes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ConfigError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise ConfigError(f"{self.path}: truncated or corrupt safetensors file (header of {n} bytes)")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.path}: corrupt safetensors header ({e})") from None
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot read ({e.strerror})") from None
        if not isinstance(header, dict):
            raise ConfigError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.data_start = 8 + n
        try:
            end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
            for e in header.values():
                e["dtype"], e["shape"] = str(e["dtype"]), [int(d) for d in e["shape"]]
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ConfigError(f"{self.path}: corrupt safetensors header (entry lacks {e})") from None
        if self.data_start + end > size:
            raise ConfigError(f"{self.path}: truncated safetensors file ({size} bytes, header says "
                              f"{self.data_start + end})")

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> np.ndarray:
        e = self.entries.get(name)
        if e is None:
            raise ConfigError(f"{self.path}: tensor {name} not found")
        dt = _CODES.get(e["dtype"])
        if dt is None:
            raise ConfigError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        start, stop = e["data_offsets"]
        count = int(np.prod(e["shape"], dtype=np.int64))
        if (stop - start) != count * dt.itemsize:
            raise ConfigError(f"{self.path}: tensor {name}: {stop - start} bytes for shape {e['shape']} {e['dtype']}")
        if count == 0:
            return np.zeros(e["shape"], dt)
        mm = np.memmap(self.path, dtype=dt, mode="r", offset=self.data_start + start, shape=(count,))
        return mm.reshape(e["shape"])


def write_safetensors(path: Path, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict | None = None) -> None:
    """Write a file whose tensors (name, shape, dtype) are known in advance, producing each on demand."""
    specs = list(specs)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dt in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dt in specs:
            arr = np.ascontiguousarray(produce(name))
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dt):
                raise ConfigError(f"{path}: tensor {name} produced as {arr.shape} {arr.dtype}, planned {shape} {dt}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))  # the tensor's bytes, without a copy
