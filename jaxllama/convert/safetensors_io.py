"""Minimal safetensors reading and streaming writing with numpy (bfloat16 via ml_dtypes).

Written here rather than taken from ``safetensors.numpy`` for two reasons: that module cannot
hold bfloat16, and its writer needs every tensor of a file in memory at once. The format is a
little-endian u64 header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the
raw bytes; knowing all shapes up front lets us write the header first and the tensors one by one.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from jaxllama.convert.common import BF16
from jaxllama.convert.validate import is_int, show
from jaxllama.errors import ConfigError

_CODES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16, "F64": np.dtype("<f8"),
          "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
          "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_NAMES = {v: k for k, v in _CODES.items()}


_MAX_HEADER = 100 * 2**20  # the reference implementation's limit


class SafetensorsFile:
    """Lazy, memory-mapped reader: ``get(name)`` maps just that tensor's bytes.

    The whole header is checked on open (it comes from the file, so from anyone): each tensor's
    dtype is known, its shape is non-negative integers, its ``data_offsets`` lie inside the data
    section and hold exactly dtype size x elements bytes, and no two tensors overlap. Without
    this, ``data_offsets [-256, 0]`` would map the header's own JSON bytes as weights.
    """

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
                    raise ConfigError(f"{self.path}: truncated or corrupt safetensors file (header of {n} bytes "
                                      f"in a file of {size})")
                if n > _MAX_HEADER:
                    raise ConfigError(f"{self.path}: corrupt safetensors header ({n} bytes; the limit is "
                                      f"{_MAX_HEADER})")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{self.path}: corrupt safetensors header ({str(e).splitlines()[0][:80]})") from None
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot read ({e.strerror})") from None
        if not isinstance(header, dict):
            raise ConfigError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise ConfigError(f"{self.path}: corrupt safetensors header (__metadata__ is not an object)")
        self.metadata = metadata or {}
        self.data_start = 8 + n
        self.entries = {name: self._entry(name, e, size - self.data_start) for name, e in header.items()}
        spans = sorted((e["data_offsets"], name) for name, e in self.entries.items() if e["nbytes"])
        for ((_, prev_end), prev), ((start, _), name) in zip(spans, spans[1:]):
            if start < prev_end:
                raise ConfigError(f"{self.path}: corrupt safetensors header (tensors {prev} and {name} overlap)")

    def _entry(self, name: str, e: object, data_size: int) -> dict:
        """One header entry, checked; ``nbytes`` and a tuple ``shape`` added."""
        def bad(what: str) -> ConfigError:
            return ConfigError(f"{self.path}: corrupt safetensors header (tensor {name}: {what})")

        if not isinstance(e, dict):
            raise bad("entry is not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in e:
                raise bad(f"lacks {key}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _CODES:
            raise bad(f"unsupported dtype {show(dtype)}; readable: {', '.join(_CODES)}")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise bad(f"shape {show(shape)} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"data_offsets {show(offsets)} are not [begin, end] with 0 <= begin <= end")
        start, stop = int(offsets[0]), int(offsets[1])
        if stop > data_size:
            raise ConfigError(f"{self.path}: truncated safetensors file (tensor {name} ends at byte {stop} of a "
                              f"{data_size}-byte data section)")
        need = math.prod(int(d) for d in shape) * _CODES[dtype].itemsize  # Python ints: no overflow
        if stop - start != need:
            raise bad(f"{stop - start} bytes for shape {shape} {dtype}, which needs {need}")
        return {"dtype": dtype, "shape": tuple(int(d) for d in shape), "data_offsets": (start, stop), "nbytes": need}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the header (nothing read)."""
        return {k: e["shape"] for k, e in self.entries.items()}

    def get(self, name: str) -> np.ndarray:
        e = self.entries.get(name)
        if e is None:
            raise ConfigError(f"{self.path}: tensor {name} not found")
        dt = _CODES[e["dtype"]]
        count = e["nbytes"] // dt.itemsize
        if count == 0:
            return np.zeros(e["shape"], dt)
        mm = np.memmap(self.path, dtype=dt, mode="r", offset=self.data_start + e["data_offsets"][0], shape=(count,))
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
