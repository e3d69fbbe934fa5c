"""Training SentencePiece BPE tokenizers (``jaxllama tokenizer train``) and the demo's cached stdlib tokenizer.

The model follows Llama 1/2's recipe: BPE with byte fallback (any text round-trips, never ``<unk>``),
digits split, no normalization and whitespace kept as is (code round-trips exactly), pieces
``<unk>``=0, ``<s>``=1, ``</s>``=2 plus ``<pad>``=3 for padding. SentencePiece trains on lines, so documents
are cut into lines and a seeded reservoir sample of at most ``max_sentences`` keeps time bounded.
"""

from __future__ import annotations

import fcntl
import io
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from jaxllama.errors import ConfigError

MAX_LINE_CHARS = 2048  # SentencePiece skips sentences over 4192 bytes; cut longer lines instead
DEFAULT_MAX_SENTENCES = 1_000_000  # the whole stdlib (~730k lines) trains 2000 pieces in ~12 s on 2 cores
SPECIAL_PIECES = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


@dataclass(frozen=True)
class TrainReport:
    """What a training run did, for the CLI's summary line."""

    output: str
    vocab_size: int
    documents: int
    lines: int
    sampled: int
    seconds: float


def _lines(documents: Iterable[str], counts: list[int]) -> Iterator[str]:
    for doc in documents:
        counts[0] += 1
        for line in doc.split("\n"):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            for start in range(0, len(line), MAX_LINE_CHARS):
                counts[1] += 1
                yield line[start:start + MAX_LINE_CHARS]


def sample_lines(documents: Iterable[str], max_sentences: int, seed: int = 0) -> tuple[list[str], int, int]:
    """A seeded reservoir sample of the documents' non-empty lines -> (sample, n_documents, n_lines)."""
    rng = random.Random(seed)
    counts = [0, 0]
    sample: list[str] = []
    for i, line in enumerate(_lines(documents, counts)):
        if i < max_sentences:
            sample.append(line)
        elif (j := rng.randrange(i + 1)) < max_sentences:
            sample[j] = line
    return sample, counts[0], counts[1]


def _spm_error(e: Exception, vocab_size: int, key: str) -> ConfigError:
    """SentencePiece's CHECK-failure text -> one line a user can act on."""
    msg = str(e)
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return ConfigError(f"{key} {vocab_size} is too small for this corpus: it needs at least "
                           f"{m.group(1)} pieces (4 special + 256 byte pieces + its characters)")
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
        return ConfigError(f"{key} {vocab_size} is too large for this corpus: at most {m.group(1)} "
                           "pieces can be learned from it (give more text or a smaller size)")
    return ConfigError(f"tokenizer training failed: {msg.strip().splitlines()[0][:300] if msg.strip() else e!r}")


def train_sentencepiece(documents: Iterable[str], vocab_size: int, output: str, **opts: Any) -> str:
    """Train a Llama-style SentencePiece BPE model on ``documents`` and write it atomically to ``output``.

    ``opts``: ``max_sentences`` (default 1M lines, sampled with ``seed``, default 0), ``report`` (a list that
    receives a :class:`TrainReport`), ``vocab_key`` (how errors name the size), and any SentencePiece
    trainer option (e.g. ``character_coverage``, ``model_type``, ``num_threads``), which override the
    defaults. Returns ``output``.
    """
    import sentencepiece as spm

    key = opts.pop("vocab_key", "--vocab-size")  # how error messages name the size (CLI flag or config key)
    if not isinstance(vocab_size, int) or vocab_size < 261:
        raise ConfigError(f"{key} {vocab_size}: must be at least 261 (4 special + 256 byte pieces + 1)")
    out = Path(output).expanduser()
    if out.is_dir():
        raise ConfigError(f"--output {output}: is a directory; give a file name such as {out / 'tokenizer.model'}")
    max_sentences = int(opts.pop("max_sentences", DEFAULT_MAX_SENTENCES))
    if max_sentences < 1:
        raise ConfigError(f"--max-sentences {max_sentences}: must be positive")
    seed = int(opts.pop("seed", 0))
    report: list[TrainReport] | None = opts.pop("report", None)
    start = time.perf_counter()
    sample, n_docs, n_lines = sample_lines(documents, max_sentences, seed)
    if not sample:
        raise ConfigError(f"tokenizer training: the input has no text ({n_docs} documents, all empty)")
    trainer = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                   allow_whitespace_only_pieces=True, character_coverage=0.9995, max_sentence_length=16384,
                   input_sentence_size=0, shuffle_input_sentence=False, num_threads=os.cpu_count() or 1,
                   minloglevel=2, **SPECIAL_PIECES)
    trainer.update(opts)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=buf, **trainer)
    except (RuntimeError, ValueError, TypeError) as e:
        raise _spm_error(e, vocab_size, key) from None
    _write_atomic(out, buf.getvalue())
    if report is not None:
        report.append(TrainReport(str(out), vocab_size, n_docs, n_lines, len(sample), time.perf_counter() - start))
    return str(out)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers see the old file or the whole new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write there ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_from_source(source: str, vocab_size: int, output: str, fmt: str = "auto", text_key: str = "text",
                      max_sentences: int = DEFAULT_MAX_SENTENCES) -> TrainReport:
    """``jaxllama tokenizer train``: documents of ``stdlib`` or a file glob -> a model at ``output``."""
    from jaxllama.data.corpus import iter_documents

    report: list[TrainReport] = []
    train_sentencepiece(iter_documents(source, fmt, text_key), vocab_size, output, max_sentences=max_sentences,
                        report=report)
    return report[0]


def default_cache_dir() -> Path:
    """``$JAXLLAMA_CACHE``, else ``~/.cache/jaxllama``."""
    return Path(os.environ.get("JAXLLAMA_CACHE") or "~/.cache/jaxllama").expanduser()


def _loads(path: Path) -> bool:
    import sentencepiece as spm

    try:
        return path.is_file() and spm.SentencePieceProcessor(model_file=str(path)).get_piece_size() > 0
    except (OSError, RuntimeError):
        return False


def cached_stdlib_tokenizer(vocab_size: int, cache_dir: str | None = None) -> str:
    """Path of the demo's tokenizer: trained once on the stdlib corpus, then reused from the cache.

    Concurrent processes (several hosts or test workers sharing a home folder) take a file lock, so only
    one trains; the model appears by an atomic rename, so no process ever reads a half-written file. A
    cached file that does not load (truncated by hand) is retrained.
    """
    from jaxllama.data.corpus import iter_documents

    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = folder / f"stdlib-sp-{vocab_size}.model"
    if _loads(path):
        return str(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f".stdlib-sp-{vocab_size}.lock", "w")
    except OSError as e:
        raise ConfigError(f"tokenizer cache {folder}: cannot write there ({e.strerror}); set JAXLLAMA_CACHE") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _loads(path):  # another process may have finished while we waited
            print(f"training the demo tokenizer: {vocab_size} pieces on the Python standard library's sources "
                  f"(first use only, 10-30 s on 2 cores; cached as {path})", file=sys.stderr, flush=True)
            # The pipeline sizes the demo tokenizer by the model's vocabulary; errors say so.
            train_sentencepiece(iter_documents("stdlib"), vocab_size, str(path),
                                vocab_key="stdlib demo tokenizer: model.vocab_size")
    return str(path)
