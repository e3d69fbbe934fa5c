"""Plain-Python document readers (no TensorFlow): the stdlib corpus and local text/JSONL files.

Tokenizer training and anything that must run without TensorFlow read documents from here; the
tf.data pipeline lists the same files through :func:`resolve_files` so both agree on what a
source contains and in which order.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from jaxllama.errors import ConfigError

from jaxllama.config import DATA_FORMATS as FORMATS


def stdlib_files() -> list[str]:
    """The ``.py`` files of the running Python's standard library, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    if not files:
        raise ConfigError(f"data.source: stdlib: no .py files under {root}")
    return sorted(str(p) for p in files)


def resolve_files(pattern: str, key: str = "data.source") -> list[str]:
    """Files matching a glob (``**`` allowed), sorted; a pattern with no match is a one-line error."""
    files = sorted(f for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
    if not files:
        raise ConfigError(f"{key}: no files match {pattern!r}")
    return files


def file_format(path: str, fmt: str = "auto") -> str:
    """``auto`` picks by extension: .jsonl/.json -> jsonl, .tfrecord* -> tfrecord, else text."""
    if fmt not in FORMATS:
        raise ConfigError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    name = Path(path).name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if ".tfrecord" in name:
        return "tfrecord"
    return "text"


@dataclass
class BadRecords:
    """What happens to a bad record: a one-line error naming file and line, or (``skip``) a count.

    One instance per pipeline; its count is logged as ``data_skipped`` so skipping is never silent.
    """

    skip: bool = False
    count: int = 0
    last: str = ""
    hint: str = "; data.skip_bad_records=true skips such records"

    def __call__(self, where: str, what: str) -> None:
        if not self.skip:
            raise ConfigError(f"{where}: {what}{self.hint}")
        self.count += 1
        self.last = f"{where}: {what}"


def bounded_lines(f, limit: int | None) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, size) of a binary file; bytes None for a line over ``limit``, whose rest is
    skipped in chunks, so one huge line never sits in memory whole."""
    lineno = 0
    while True:
        raw = f.readline(limit + 1) if limit else f.readline()
        if not raw:
            return
        lineno += 1
        if limit and len(raw) > limit and not raw.endswith(b"\n"):
            size = len(raw)
            while True:
                chunk = f.readline(1 << 20)
                size += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield lineno, None, size
        else:
            yield lineno, raw, len(raw)


def too_large(size: int, limit: int) -> str:
    return f"{size} bytes, larger than data.max_record_bytes={limit} (raise it for records this large)"


def read_documents(path: str, fmt: str = "auto", text_key: str = "text", bad: BadRecords | None = None,
                   lenient: bool = False, max_bytes: int | None = None) -> Iterator[str]:
    """Documents of one local file: the whole file (text), one per line (lines), or ``text_key`` (jsonl).

    An empty file, invalid UTF-8, a line that is not a JSON object or lacks ``text_key`` goes to
    ``bad`` (an error by default). ``lenient`` (the stdlib demo corpus, which has empty
    ``__init__.py`` files and a few latin-1 test files) skips empty files and replaces bad bytes. A line
    over ``max_bytes`` is a bad record, found without reading it whole.
    """
    bad = bad or BadRecords()
    fmt = file_format(path, fmt)
    if fmt == "tfrecord":
        raise ConfigError(f"{path}: TFRecord files are read by the tf.data pipeline, not as plain text")
    errors = "replace" if lenient else "strict"
    with open(path, "rb") as f:
        if fmt == "text":
            data = f.read()
            if data:
                text = _decode(data, errors, path, 1, bad)
                if text is not None:
                    yield text
            elif not lenient:
                bad(path, "empty file")
            return
        lineno = 0
        for lineno, raw, size in bounded_lines(f, max_bytes):
            if raw is None:
                bad(f"{path}:{lineno}", too_large(size, max_bytes))
                continue
            line = _decode(raw, errors, path, lineno, bad)
            if line is None or not line.strip():
                continue
            if fmt == "lines":
                yield line.rstrip("\r\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(f"{path}:{lineno}", f"not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict) or text_key not in record:
                bad(f"{path}:{lineno}", f"no key {text_key!r} (set data.text_key)")
            elif not isinstance(record[text_key], str):
                bad(f"{path}:{lineno}", f"{text_key!r} is a {type(record[text_key]).__name__}, not a string")
            else:
                yield record[text_key]
        if lineno == 0 and not lenient:
            bad(path, "empty file")


def chat_records(path: str, encoder, bad: BadRecords | None = None) -> Iterator[tuple[str, Any]]:
    """(``file:line``, (ids, mask) or None when dropped) per record of one chat/prompt_completion JSONL
    file; a bad record goes to ``bad`` with its file:line."""
    from jaxllama.data.chat_data import BadRecord, encode_line

    bad = bad or BadRecords()
    lineno = 0
    limit = getattr(encoder, "max_record_bytes", None)
    with open(path, "rb") as f:
        for lineno, raw, size in bounded_lines(f, limit):
            if raw is None:
                bad(f"{path}:{lineno}", too_large(size, limit))
                continue
            line = _decode(raw, "strict", path, lineno, bad)
            if line is None or not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", encode_line(encoder, line)
            except BadRecord as e:
                bad(f"{path}:{lineno}", str(e))
    if lineno == 0:
        bad(path, "empty file")


def read_chat_documents(path: str, encoder, bad: BadRecords | None = None) -> Iterator[bytes]:
    """The encoded documents (``encoder.pack``: bytes for tf.data) of :func:`chat_records`."""
    for _, doc in chat_records(path, encoder, bad):
        if doc is not None:
            yield encoder.pack(doc)


def _decode(data: bytes, errors: str, path: str, first_line: int, bad: BadRecords) -> str | None:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = first_line + data[:e.start].count(b"\n")
        bad(f"{path}:{line}", f"invalid UTF-8 (byte 0x{data[e.start]:02x})")
        return None


def iter_documents(spec: str, fmt: str = "auto", text_key: str = "text") -> Iterator[str]:
    """Documents of ``stdlib`` or a file glob, in file order (for tokenizer training and tests)."""
    files = stdlib_files() if spec == "stdlib" else resolve_files(spec, key="--input")
    for path in files:
        yield from read_documents(path, "text" if spec == "stdlib" else fmt, text_key, BadRecords(hint=""),
                                  lenient=spec == "stdlib")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source string: kind is stdlib | files | tfds | synthetic."""

    kind: str
    pattern: str = ""  # files: the glob
    name: str = ""  # tfds: NAME[:VERSION]

    @classmethod
    def parse(cls, spec: str, key: str = "data.source") -> "SourceSpec":
        if spec in ("stdlib", "synthetic"):
            return cls(spec)
        if spec.startswith("tfds:"):
            name = spec[len("tfds:"):]
            if not name:
                raise ConfigError(f"{key}: 'tfds:' needs a dataset name, e.g. tfds:c4/en:3.0.1")
            return cls("tfds", name=name)
        pattern = spec[len("files:"):] if spec.startswith("files:") else spec
        if not pattern:
            raise ConfigError(f"{key}: empty; use stdlib, synthetic, tfds:NAME[:VERSION] or a file glob")
        return cls("files", pattern=pattern)
