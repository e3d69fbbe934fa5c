"""The text pipeline: documents (tf.data) -> token ids (tokenizer inside tf.data) -> packed rows (numpy).

tf.data reads, shuffles and tokenizes in parallel threads outside the GIL; a small Python packer
turns documents into rows, and a background thread keeps ``data.prefetch`` batches ready so the
train step never waits on input.

Exact resume: the position is (epoch, documents taken this epoch, the packer's arrays). The
document stream of an epoch is deterministic, so restoring skips that many raw documents
*before* tokenization (cheap) and puts the packer back as it was: the resumed run sees exactly
the batches it would have seen, none repeated and none skipped. Each process has its own state.
"""

from __future__ import annotations

import base64
import io
import queue
import threading
from typing import Any, Iterator

import numpy as np

from jaxllama.config import DataConfig
from jaxllama.data.corpus import BadRecords
from jaxllama.data.packing import Packer
from jaxllama.errors import ConfigError, RunError

TOKENIZE_BATCH = 64  # documents per tokenizer call inside tf.data
_STOP = object()


def encode_arrays(arrays: dict[str, np.ndarray]) -> str:
    """Arrays -> base64 text (so a state stays JSON)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_arrays(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text))) as z:
        return {k: z[k] for k in z.files}


class TextSource:
    """Iterator of this process's rows of each global batch, with ``state()``/``restore()``.

    ``finite=True`` (eval): one pass, no shuffle; the last batch is padded with empty rows and
    iteration then stops.
    """

    def __init__(self, spec, d: DataConfig, tokenizer, *, local_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, split: str = "train", holdout: str | None = None, finite: bool = False,
                 key: str = "data.source"):
        self.spec, self.d, self.tok = spec, d, tokenizer
        self.local_batch, self.seed, self.finite, self.key = local_batch, seed, finite, key
        self.process_index, self.process_count, self.split, self.holdout = process_index, process_count, split, holdout
        self.add_bos = tokenizer.add_bos if d.add_bos is None else d.add_bos
        self.add_eos = tokenizer.add_eos if d.add_eos is None else d.add_eos
        self.epoch, self.docs = 0, 0  # position of the producer
        self.packer = make_packer(d, tokenizer)
        self._consumed: dict[str, Any] | None = None  # snapshot after the last batch handed out
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self.efficiency = 1.0
        self.bad = BadRecords(skip=d.skip_bad_records)  # shared with the reader: counts skipped records
        self.encoder = None  # chat formats: renders and masks records in the reader (counts truncations)
        from jaxllama.config import CHAT_FORMATS

        if d.format in CHAT_FORMATS:
            from jaxllama.data.chat_data import encoder_for

            self.encoder = encoder_for(d, tokenizer)
        from jaxllama.data.documents import check_source

        check_source(spec, d, split, key)

    # -- producer ------------------------------------------------------------------------------

    def _token_batches(self, epoch: int, skip: int) -> Iterator[list]:
        """Lists of documents: token ids, or (ids, mask) for chat formats."""
        import tensorflow as tf

        from jaxllama.data.documents import documents
        from jaxllama.data.tokenizers import tf_tokenize

        ds = documents(self.spec, self.d, epoch=epoch, seed=self.seed, shuffle=self.d.shuffle and not self.finite,
                       process_index=self.process_index, process_count=self.process_count, split=self.split,
                       holdout=self.holdout, key=self.key, bad=self.bad, encoder=self.encoder)
        if self.encoder is not None:  # already tokenized and masked by the reader
            for raw in ds.skip(skip).batch(TOKENIZE_BATCH).prefetch(2).as_numpy_iterator():
                yield [self.encoder.unpack(bytes(x)) for x in raw]
            return
        encode = tf_tokenize(self.tok)

        def tokenize(texts):
            ragged = encode(texts)
            return ragged.flat_values, ragged.row_lengths()

        ds = ds.skip(skip).batch(TOKENIZE_BATCH).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        for flat, lengths in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
            yield np.split(flat.astype(np.int32), np.cumsum(lengths)[:-1])

    def _document(self, ids: np.ndarray) -> np.ndarray:
        parts = ([[self.tok.bos_id]] if self.add_bos and self.tok.bos_id is not None else []) + [ids]
        if self.add_eos and self.tok.eos_id is not None:
            parts.append([self.tok.eos_id])
        return np.concatenate(parts).astype(np.int32)

    def _produce(self) -> None:
        try:
            while not self._halt.is_set():
                got = 0
                for docs in self._token_batches(self.epoch, self.docs):
                    for doc in docs:
                        if self.encoder is not None:
                            self.encoder.place(self.packer, doc)  # complete (template specials included), masked
                        else:
                            self.packer.add(self._document(doc))
                        self.docs += 1
                        got += 1
                        while len(self.packer.ready) >= self.local_batch:
                            if not self._emit():
                                return
                if self.finite:
                    self.packer.flush()
                    while self.packer.ready:
                        if not self._emit():
                            return
                    break
                if got == 0 and self.docs == 0:
                    raise RunError(f"{self.key}: process {self.process_index} of {self.process_count} got no "
                                   f"documents from {self._describe()}")
                self.epoch, self.docs = self.epoch + 1, 0
            self._put(_STOP)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(_readable(e, self.key))

    def _emit(self) -> bool:
        batch = self.packer.pop(self.local_batch)
        snapshot = {"epoch": self.epoch, "docs": self.docs, "packer": self.packer.state()}
        return self._put((batch, snapshot, self.packer.efficiency))

    def _put(self, item) -> bool:
        while not self._halt.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def describe(self) -> str:
        """One line for the run's log: where documents come from, the tokenizer, the packing."""
        chat = ""
        if self.encoder is not None:
            from jaxllama.data.chat_format import resolve_format

            fmt = resolve_format(self.tok, self.d.chat_template, key="data.chat_template")[0]
            chat = (f"{self.d.format} records in the {fmt} chat format, loss on {self.d.loss_on} tokens, "
                    f"truncate {self.d.truncate}, ")
        return (f"data: {self._describe()}, {chat}tokenizer {self.tok.path} ({self.tok.kind}, {self.tok.vocab_size} "
                f"ids), {self.d.packing} into {self.d.seq_len}-token rows, {self.local_batch} rows per batch on this "
                f"process")

    def _describe(self) -> str:
        s = self.spec
        return {"tfds": f"tfds:{s.name} split {self.split}", "files": s.pattern}.get(s.kind, s.kind)

    # -- consumer ------------------------------------------------------------------------------

    def __iter__(self) -> "TextSource":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._thread is None:
            self._queue = queue.Queue(maxsize=max(1, self.d.prefetch))
            self._halt.clear()
            self._thread = threading.Thread(target=self._produce, name="jaxllama-data", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is _STOP:
            self._queue.put(_STOP)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        batch, self._consumed, self.efficiency = item
        return batch

    def empty_batch(self) -> dict[str, np.ndarray]:
        """A batch of padding only (loss_mask 0): what a process that ran dry feeds a collective eval."""
        return make_packer(self.d, self.tok).pop(self.local_batch)

    def close(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join(timeout=10)
            self._thread = None

    def state(self) -> dict:
        """JSON-serializable position after the last batch handed out (this process only)."""
        snap = self._consumed or {"epoch": self.epoch, "docs": self.docs, "packer": self.packer.state()}
        return {"kind": "text", "epoch": snap["epoch"], "docs": snap["docs"], "packer": encode_arrays(snap["packer"]),
                "process_index": self.process_index, "process_count": self.process_count}

    def restore(self, state: dict) -> None:
        """Continue exactly after the batch ``state`` was taken from (same source, seed and process layout)."""
        if not isinstance(state, dict) or state.get("kind") != "text":
            kind = state.get("kind") if isinstance(state, dict) else None
            raise RunError(f"data state is for a {kind!r} source, not a text source" if kind is not None
                           else "data state names no source (damaged)")
        if (state["process_index"], state["process_count"]) != (self.process_index, self.process_count):
            raise RunError(f"data state was saved by process {state['process_index']} of {state['process_count']}, "
                           f"this is process {self.process_index} of {self.process_count}")
        for key in ("epoch", "docs"):
            v = state.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RunError(f"data state: {key} {str(v)[:40]!r} is not a count")
        self.close()
        self.epoch, self.docs = state["epoch"], state["docs"]
        self.packer = make_packer(self.d, self.tok)
        self.packer.restore(decode_arrays(state["packer"]))
        self._consumed = None


def make_packer(d: DataConfig, tok) -> Packer:
    """The packer ``data.*`` describes: preference rows hold at most ``data.pairs_per_row`` pairs."""
    return Packer(d.seq_len, d.packing, pad_id=tok.pad_id,
                  max_segments=2 * d.pairs_per_row if d.format == "preference" else 0)


def _readable(e: BaseException, key: str) -> BaseException:
    """tf.data wraps errors raised inside it (e.g. a bad JSONL line) in a long OpError: keep the message."""
    if type(e).__module__.startswith("tensorflow"):
        lines = [ln.strip() for ln in str(getattr(e, "message", e)).splitlines() if ln.strip()]
        ours = [ln for ln in lines if "ConfigError:" in ln or "RunError:" in ln]
        text = ours[-1].split("Error:", 1)[1].strip() if ours else (lines[0] if lines else type(e).__name__)
        kind = ConfigError if ours and "ConfigError:" in ours[-1] else RunError  # bad input stays exit 2
        return kind(f"{key}: {text}")
    return e
