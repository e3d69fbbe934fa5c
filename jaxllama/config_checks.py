"""Bounded reading of untrusted configuration text: YAML files and ``key=value`` overrides.

A config is a few hundred values, so anything far larger is an attack or an accident, and either
must end in one short line, not in minutes of CPU and gigabytes of memory: a YAML anchor bomb
(aliases that expand to 10^9 values, though the document is a few hundred bytes), nesting deep
enough to exhaust Python's recursion, binary or non-UTF-8 files, integers too long to print, and
error messages that would quote any of these whole. Aliases and anchors stay legal; what they
expand to is counted (shared values counted once per use, as every later reader sees them).
"""

from __future__ import annotations

import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxllama.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a saved run config is about 5 KB
MAX_DEPTH = 32  # the deepest values (train.lora.targets' items, mesh.rules' axes) are 4-5 levels down
MAX_VALUES = 100_000  # values after alias expansion; a config has a few hundred
MAX_QUOTE = 200  # characters of a value quoted in an error message
MAX_MESSAGE = 1000  # characters of any one-line error message
MAX_RECORD_BYTES = 16 << 20  # data.max_record_bytes default: a JSONL line, TFRecord record or text document

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_QUOTE
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def short(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` cut to about ``limit`` characters without building the whole repr first (a
    shared-list bomb's full repr is gigabytes; a 5,000-digit int has none at all)."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit; a self-containing list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """A message as one line of at most ``limit`` characters (what the CLI prints for an error)."""
    flat = " ".join(str(message).splitlines())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class BoundError(yaml.YAMLError):
    """YAML that parses but is refused for its size or depth (never turned into a plain string)."""

    def __init__(self, problem: str, mark: Any = None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_DEPTH while composing, before Python's recursion
    limit turns it into a RecursionError (the composer recurses once per level)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise BoundError(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def expanded_size(value: Any, limit: int = MAX_VALUES) -> tuple[int, dict[int, int]]:
    """(how many values ``value`` holds once shared lists and dicts are expanded, capped at limit + 1;
    the per-container counts by id). Iterative and memoized: linear in the distinct containers, so a
    10^9-value bomb of a few hundred bytes is measured in microseconds. A container that contains
    itself (``a: &a [*a]``) is a :class:`BoundError`."""
    memo: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        obj, done = stack.pop()
        if not isinstance(obj, (list, tuple, dict)):
            continue
        children = [x for kv in obj.items() for x in kv] if isinstance(obj, dict) else obj
        key = id(obj)
        if done:
            total = 1 + sum(memo.get(id(c), 1) if isinstance(c, (list, tuple, dict)) else 1 for c in children)
            memo[key] = min(total, limit + 1)
            active.discard(key)
        elif key in active:  # reached again while its own children are being counted: a cycle
            raise BoundError("a YAML alias refers to a value that contains it (a recursive alias)")
        elif key not in memo:
            active.add(key)
            stack.append((obj, True))
            stack.extend((c, False) for c in children if isinstance(c, (list, tuple, dict)))
    size = memo.get(id(value), 1)
    return size, memo


def check_size(value: Any, where: str) -> None:
    """Refuse a value holding more than MAX_VALUES values, naming the deepest key that alone does."""
    try:
        size, memo = expanded_size(value)
    except BoundError as e:
        raise ConfigError(f"{where}: {e.problem}") from None
    if size <= MAX_VALUES:
        return
    path = []
    while isinstance(value, dict):
        big = [(k, v) for k, v in value.items() if memo.get(id(v), 1) > MAX_VALUES]
        if not big:
            break
        path.append(str(big[0][0]))
        value = big[0][1]
    key = f" ({'.'.join(path)})" if path else ""
    raise ConfigError(one_line(f"{where}{key}: holds more than {MAX_VALUES} values once YAML aliases are expanded "
                               "(an alias bomb?); a config has a few hundred"))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the depth bound (a :class:`BoundError`, or another ``yaml.YAMLError``).
    An integer too long for Python to convert is a YAML error too, not a ValueError from inside PyYAML."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except ValueError as e:  # e.g. int("9" * 5000): "Exceeds the limit (4300 digits)"
        raise yaml.YAMLError(str(e).split(";")[0]) from None


def read_yaml_file(path: Path) -> Any:
    """A config file's YAML tree, every failure one line naming the file (and line when known)."""
    if not _is_file(path):
        raise ConfigError(f"config file {cut(path)}: not found")
    name = cut(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {name}: {size} bytes; a config is at most {MAX_CONFIG_BYTES} bytes "
                          "(is it a config file?)")
    data = path.read_bytes()
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise ConfigError(f"config file {name} line {line}: a NUL byte; this is binary, not a YAML text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"config file {name} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                          "is it a config file?") from None
    try:
        tree = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(one_line(f"config file {name}{_where(e, text)}: invalid YAML ({_problem(e)})")) from None
    check_size(tree, f"config file {name}")
    return tree


def parse_value(raw: str, key: str) -> Any:
    """An override's value: a YAML scalar or list (``3e-4``, ``true``, ``[a, b]``); text that is not
    YAML stays a string (``data.source=[draft].txt``), but a bomb or deep nesting is an error."""
    if not raw.strip():
        return ""
    try:
        value = load_yaml(raw)
    except BoundError as e:
        raise ConfigError(one_line(f"{cut(key)}: {_problem(e)}")) from None
    except yaml.YAMLError:
        return raw
    check_size(value, cut(key))
    return value


def cut(text: str, limit: int = MAX_QUOTE) -> str:
    """A key, path or name as the user typed it (no quotes), cut for quoting: they are short; a hostile
    one need not be."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(e: yaml.YAMLError, text: str = "") -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f" line {mark.line + 1}"
    if isinstance(e, yaml.reader.ReaderError) and text:  # a control character: no mark, a position
        return f" line {text[: e.position].count(chr(10)) + 1}"
    return ""


def _problem(e: yaml.YAMLError) -> str:
    text = one_line(str(getattr(e, "problem", None) or getattr(e, "reason", None) or e))
    return text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 3] + "..."


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's annotation; ints may become floats, nothing else converts. Numbers
    must be finite and fit 64 bits: nan, inf or a 5,000-digit int is a mistake wherever it appears."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {short(value)}")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not -2**63 <= value < 2**63:  # past int64: NumPy, TensorFlow and JAX overflow or truncate it
                raise ConfigError(f"{key}: {short(value)} does not fit in 64 bits")
            return value
        raise ConfigError(f"{key}: expected an integer, got {short(value)}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2**1024 else math.inf
        elif isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {short(value)}")
        if not math.isfinite(number):  # nan/inf: every float setting is a rate, a size or a scale
            raise ConfigError(f"{key}: must be a finite number, got {short(value)}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {short(value)}")
    if hint is list or typing.get_origin(hint) is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}: expected a list, got {short(value)}")
    return value


def parse_rules(text: str, key: str = "--rules") -> list:
    """Logical-axis rules for inference: a YAML list as in ``mesh.rules`` (``"[[kv_heads, null]]"`` is
    not a merge: give the whole table), or a YAML file: a bare list, or a config (a run's config.yaml)
    whose ``mesh.rules`` is taken. Read with the same bounds as a config file."""
    path = Path(text).expanduser()
    if _is_file(path):
        tree = read_yaml_file(path)
        mesh = tree.get("mesh") if isinstance(tree, dict) else None
        rules = mesh.get("rules") if isinstance(mesh, dict) else tree
        where = f"{key} {cut(text)}"
    else:
        rules, where = parse_value(text, key), key
    if not isinstance(rules, list):
        raise ConfigError(f"{where}: expected a list of [logical_name, mesh_axes] rules (or a config file with "
                          "mesh.rules)")
    validate_rules(rules, where)
    return rules


def validate_rules(rules: list, key: str) -> None:
    """Each rule is ``[logical_name, mesh_axis or [mesh_axes]]`` naming a real logical axis."""
    import difflib

    from jaxllama.parallel.mesh import AXES
    from jaxllama.parallel.sharding import LOGICAL_NAMES

    for i, rule in enumerate(rules):
        ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
        axes = rule[1] if ok else None
        axes = [axes] if isinstance(axes, str) or axes is None else axes
        if not ok or not isinstance(axes, (list, tuple)) or any(a not in AXES for a in axes if a is not None):
            raise ConfigError(f"{key}[{i}]: expected [logical_name, mesh_axis or [mesh_axes]] with axes "
                              f"from {', '.join(AXES)}; got {short(rule)}")
        if rule[0] not in LOGICAL_NAMES:  # a typo would silently leave its dimension unsharded
            close = difflib.get_close_matches(rule[0][:MAX_QUOTE], LOGICAL_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key}[{i}]: {short(rule[0])} is not a logical axis{hint}; they are "
                              f"{', '.join(LOGICAL_NAMES)}")


def _is_file(path: Path) -> bool:
    """``Path.is_file`` that answers False for a name the OS refuses (too long), rather than raising."""
    try:
        return path.is_file()
    except (OSError, ValueError):  # ENAMETOOLONG; ValueError: an embedded NUL
        return False


def exists(path: str) -> bool:
    """Whether a local path exists; False (not an OSError) for a name the OS refuses."""
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError, RuntimeError):  # RuntimeError: ~user that cannot be expanded
        return False
