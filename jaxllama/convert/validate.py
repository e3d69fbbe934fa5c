"""Checks every reader runs on a checkpoint's description before a single tensor is allocated.

A checkpoint's config (``config.json``, ``params.json``, GGUF metadata) and its weight files can
disagree, by accident or on purpose. Believing the config alone writes wrong models (a 0-layer
model, a tied head because one tensor was not listed) or tries to allocate what no machine has
(``num_hidden_layers: 1e9``). So each reader (1) checks every number it uses is the right type and
range, naming the file and the format's own key, and (2) compares the tensors the config implies
with the tensors present (names and shapes, cheap: from headers), counting layers first so a lying
count costs nothing. Every failure is one :class:`ConfigError` line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from jaxllama.errors import ConfigError

Shape = tuple[int, ...]


def show(value: Any, limit: int = 60) -> str:
    """A value as it would appear in the file (JSON), cut short so a message stays one short line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    """An integer in the file's own type (JSON/GGUF ints, numpy ints); never a bool or a float like 2.0."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, where: object, key: str) -> int:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{where}: {key}={show(value)} is not a positive integer")
    return int(value)


def positive_number(value: Any, where: object, key: str) -> float:
    ok = (is_int(value) or isinstance(value, (float, np.floating))) and np.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{where}: {key}={show(value)} is not a positive number")
    return float(value)


def boolean(value: Any, where: object, key: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{where}: {key}={show(value)} is not true or false")
    return bool(value)


def mapping_or_none(value: Any, where: object, key: str) -> dict:
    """A nested config object (``rope_scaling``...); null/absent is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}={show(value)} is not an object (expected null or {{...}})")
    return value


def layer_indices(names: Iterable[str], pattern: re.Pattern) -> set[int]:
    """The layer numbers that appear in tensor names (``model.layers.7.…`` -> 7)."""
    return {int(m.group(1)) for n in names if (m := pattern.match(n))}


def check_layer_count(n_layers: int, present: set[int], cfg_where: object, key: str, weights_where: object,
                      first_tensor: Callable[[int], str]) -> None:
    """The config's layer count must be exactly the layers 0..n-1 present; checked in O(layers present),
    so ``block_count=10**9`` is refused at once instead of planning a billion layers."""
    i = 0
    while i in present and i < n_layers:
        i += 1
    if i < n_layers:  # a layer the config promises is absent
        problem = f"tensor {first_tensor(i)} not found"
    else:
        extra = sorted(j for j in present if j >= n_layers)
        if not extra:
            return
        problem = f"unexpected tensor {first_tensor(extra[0])}"
    raise ConfigError(f"{cfg_where}: {key}={n_layers}, but {weights_where} has {len(present)} layer"
                      f"{'s' if len(present) != 1 else ''} ({problem})")


def check_tensors(expected: Mapping[str, Shape], present: Mapping[str, Shape], where_of: Callable[[str], str],
                  missing_where: str, ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Exactly the ``expected`` tensors (format names -> shapes in the file's layout) must be ``present``,
    each with its shape; anything else present is an error too unless ``ignore`` says it is harmless."""
    for name, want in expected.items():
        have = present.get(name)
        if have is None:
            raise ConfigError(f"{missing_where}: tensor {name} not found")
        if tuple(have) != tuple(want):
            raise ConfigError(f"{where_of(name)}: shape {tuple(have)} does not match the config's {tuple(want)}")
    extra = sorted(n for n in present if n not in expected and not ignore(n))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ConfigError(f"{where_of(extra[0])}: unexpected tensor{more} (not part of a Llama with this config)")


def canonical_shapes(m) -> Callable[[str], Shape]:
    """``shape(name)`` of each canonical tensor (per layer, no stacked axis), the model asked once."""
    from jaxllama.model.llama import Arch, param_shapes

    shapes = param_shapes(Arch.from_config(dataclasses.replace(m, tie_embeddings=False)))
    return lambda name: tuple(shapes[name] if name in shapes else shapes[f"layers/{name}"][1:])
