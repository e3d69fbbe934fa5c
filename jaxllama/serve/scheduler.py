"""Continuous batching: the host loop that admits requests into slots, prefills them in chunks and
decodes every running slot together.

Each iteration (:meth:`Scheduler.step`): cancelled sequences leave their slots; waiting ones take
free slots (first come, first served); one prompt chunk runs for the oldest sequence still being
prefilled; then one decode step for every sequence that is generating. A finished sequence frees its
slot at once, so the next waiting one is admitted in the next iteration. A long prompt is split
into ``chunk``-token pieces, so it delays the running sequences by one chunk per step, not by its
whole length.

Sequences report through their ``emit`` callback (called on the engine thread): text deltas safe
to show (held back while a stop string or a UTF-8 sequence may still be forming), the new tokens
with their log-probabilities, and at the end ``finish_reason``. Greedy output does not depend on
the other slots: every row's computation is its own (see :mod:`jaxllama.serve.slots`).
"""

from __future__ import annotations

import collections
import itertools
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from jaxllama.errors import first_line
from jaxllama.infer.generate import TextStops
from jaxllama.serve.executor import Executor
from jaxllama.serve.slots import Flags, pack_rows

DEFAULT_SETTINGS = dict(temperature=0.0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                        frequency_penalty=0.0, top_k=0, seed=0, step=0)


class QueueFull(Exception):
    """More requests than the server queues: the API answers 429."""


@dataclass
class Sequence:
    """One completion being produced (a request with ``n`` choices is ``n`` of them)."""

    prompt: list[int]
    max_tokens: int
    settings: dict  # :data:`DEFAULT_SETTINGS` keys (``step`` excluded)
    stops: TextStops
    stop_ids: frozenset = frozenset()
    top: int = 0  # alternatives wanted per token (0: none)
    score: bool = False  # the prompt's own log-probabilities (echo with logprobs)
    emit: Callable[[dict], None] = lambda event: None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # entry j: log P(prompt[j+1] | prompt[:j+1])
    prompt_tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    cut_text: str | None = None  # the text before a stop string, once one is hit
    error: str | None = None  # the step that held this sequence failed
    stop_token: tuple | None = None  # (id, logprob, alternatives) of the stop token that ended it
    cancelled: bool = False
    slot: int | None = None
    filled: int = 0  # prompt tokens in the cache
    sent: int = 0  # characters of text already emitted
    order: int = 0
    arrived: float = field(default_factory=time.monotonic)

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.prompt)

    @property
    def generated(self) -> int:
        """Tokens generated, the stop token that ended it included (OpenAI's completion_tokens)."""
        return len(self.tokens) + (self.stop_token is not None)

    def text(self, final: bool = True) -> str:
        """The text so far (final: all of it; else what is safe to show while more may come)."""
        return self.cut_text if self.cut_text is not None else self.stops.printable(self.tokens, final)

    def row_settings(self) -> dict:
        return dict(self.settings, step=len(self.tokens))


class Scheduler:
    """The slots, the queue, and the loop that runs them (one engine thread calls :meth:`run`)."""

    def __init__(self, executor: Executor, max_queue: int = 64):
        self.ex, self.prog = executor, executor.prog
        self.max_queue = max_queue
        self.slots: list[Sequence | None] = [None] * self.prog.slots
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.counter = itertools.count()
        self.stats = collections.Counter()
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of steps

    # -- called by request handlers (any thread) ----------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue ``seqs`` (one request's choices) together, or raise :class:`QueueFull`."""
        with self.lock:
            if len(self.waiting) + len(seqs) > self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the server's queue is full ({self.max_queue} waiting); retry later")
            for s in seqs:
                s.order = next(self.counter)
                self.waiting.append(s)
        self.wake.set()

    def cancel(self, seqs: list[Sequence]) -> None:
        """The client went away: the sequences leave at the next step."""
        for s in seqs:
            s.cancelled = True
        self.wake.set()

    def load(self) -> dict:
        """Queue and slot occupancy, KV-cache use, recent tokens/s (for /metrics and /health)."""
        with self.lock:
            running = [s for s in self.slots if s is not None]
            waiting = len(self.waiting)
        used = sum(s.filled + len(s.tokens) for s in running)
        now = time.monotonic()
        window = [n for t, n in self.recent if now - t <= 10.0]
        return dict(waiting=waiting, running=len(running), slots=self.prog.slots,
                    kv_used=used / (self.prog.slots * self.prog.max_len), tokens_per_s=sum(window) / 10.0,
                    **self.stats)

    # -- the engine thread ----------------------------------------------------------------------------

    def run(self) -> None:
        """Step until :meth:`stop`; idle, wait for work (several processes: keep them in step). A step
        that fails ends the sequences it held with an error (their clients get a 500) and the loop
        goes on with a fresh cache: one bad step does not take the server down."""
        try:
            while not self.stopping.is_set():
                try:
                    busy = self.step()
                except Exception as e:  # noqa: BLE001 - reported to every client it affects
                    self.fail(f"{type(e).__name__}: {first_line(e)}")
                    continue
                if not busy:
                    self.wake.wait(timeout=1.0)
                    self.wake.clear()
                    self.ex.idle()
        finally:
            self.ex.close()

    def fail(self, message: str) -> None:
        """End every sequence in a slot with ``error``, and start over with an empty cache."""
        print(f"jaxllama serve: a step failed: {message}", file=sys.stderr, flush=True)
        self.stats["failed_steps"] += 1
        for i, s in enumerate(self.slots):
            if s is not None:
                self.slots[i] = None
                s.finish_reason, s.error = "error", message
                s.emit(dict(text="", final=True, finish_reason="error", error=message))
        self.ex.reset()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        self._release_cancelled()
        self._admit()
        running = [s for s in self.slots if s is not None]
        if not running:
            return False
        filling = [s for s in running if s.prefilling]
        if filling:
            self._prefill(min(filling, key=lambda s: s.order))
        decoding = [s for s in self.slots if s is not None and not s.prefilling and s.finish_reason is None]
        if decoding:
            self._decode(decoding)
        return True

    def _release_cancelled(self) -> None:
        with self.lock:
            kept = [s for s in self.waiting if not s.cancelled]
            self.stats["cancelled"] += len(self.waiting) - len(kept)
            self.waiting = collections.deque(kept)
        for i, s in enumerate(self.slots):
            if s is not None and s.cancelled:
                self.slots[i] = None
                self.stats["cancelled"] += 1

    def _admit(self) -> None:
        with self.lock:
            for i in range(len(self.slots)):
                if self.slots[i] is None and self.waiting:
                    s = self.waiting.popleft()
                    s.slot, s.filled = i, 0
                    self.slots[i] = s

    def _prefill(self, s: Sequence) -> None:
        c = self.prog.chunk
        start = s.filled
        piece = s.prompt[start:start + c]
        tokens = np.zeros((c,), np.int32)
        tokens[:len(piece)] = piece
        targets = np.zeros((c,), np.int32)
        nxt = s.prompt[start + 1:start + c + 1]
        targets[:len(nxt)] = nxt
        draw = s.settings["temperature"] > 0
        flags = Flags(draw=draw, sort=draw and _sorts(s.settings), penalize=_penalizes(s.settings), top=s.top > 0,
                      score=s.score)
        floats, ints = pack_rows([s.row_settings()])
        out = self.ex.prefill(s.slot, tokens, start, len(piece) - 1, targets, floats, ints, flags)
        s.filled = start + len(piece)
        if s.score:
            n = len(nxt)
            s.prompt_logprobs += out["score"][:n].tolist()
            if s.top:
                ids, vals = out["score_top"]
                s.prompt_tops += [list(zip(ids[j, :s.top].tolist(), vals[j, :s.top].tolist())) for j in range(n)]
        self.stats["prompt_tokens"] += len(piece)
        if s.prefilling:
            return
        if s.max_tokens == 0:
            self._finish(s, "length")
            return
        self._accept(s, int(out["token"]), float(out["logprob"]), out.get("top"), 0)
        self.recent.append((time.monotonic(), 1))

    def _decode(self, seqs: list[Sequence]) -> None:
        n = self.prog.slots
        tokens = np.zeros((n,), np.int32)
        positions = np.zeros((n,), np.int32)
        active = np.zeros((n,), bool)
        settings = [dict(DEFAULT_SETTINGS) for _ in range(n)]
        for s in seqs:
            tokens[s.slot] = s.tokens[-1]
            positions[s.slot] = len(s.prompt) + len(s.tokens) - 1
            active[s.slot] = True
            settings[s.slot] = s.row_settings()
        draw = any(s.settings["temperature"] > 0 for s in seqs)
        flags = Flags(draw=draw, sort=any(s.settings["temperature"] > 0 and _sorts(s.settings) for s in seqs),
                      penalize=any(_penalizes(s.settings) for s in seqs), top=any(s.top > 0 for s in seqs))
        floats, ints = pack_rows(settings)
        out = self.ex.decode(tokens, positions, active, floats, ints, flags)
        for s in seqs:
            self._accept(s, int(out["token"][s.slot]), float(out["logprob"][s.slot]), out.get("top"), s.slot)
        self.recent.append((time.monotonic(), len(seqs)))
        while self.recent and time.monotonic() - self.recent[0][0] > 10.0:
            self.recent.popleft()

    def _accept(self, s: Sequence, token: int, logprob: float, top: Any, row: int) -> None:
        """A new token for ``s``: stop id, stop string, token budget or a full context ends it."""
        self.stats["completion_tokens"] += 1
        if token in s.stop_ids:  # not in the text, but in the log-probabilities (lm-eval scores it)
            s.stop_token = (token, logprob, _row_top(top, row, s.top))
            self._finish(s, "stop")
            return
        s.tokens.append(token)
        s.logprobs.append(logprob)
        if s.top:
            s.tops.append(_row_top(top, row, s.top))
        text, keep = s.stops.cut(s.tokens) if s.stops.stops else (None, None)
        if keep is not None:
            del s.tokens[keep:], s.logprobs[keep:], s.tops[keep:]
            s.cut_text = text
            self._finish(s, "stop")
        elif len(s.tokens) >= s.max_tokens or len(s.prompt) + len(s.tokens) >= self.prog.max_len:
            self._finish(s, "length")
        else:
            self._emit(s, final=False)

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        self.slots[s.slot] = None
        self.stats["finished"] += 1
        self._emit(s, final=True)

    def _emit(self, s: Sequence, final: bool) -> None:
        text = s.text(final)
        delta, s.sent = text[s.sent:], max(s.sent, len(text))
        s.emit(dict(text=delta, final=final, finish_reason=s.finish_reason))


def _row_top(top: Any, row: int, k: int) -> list[tuple[int, float]]:
    if not k:
        return []
    ids, vals = top
    return list(zip(ids[row, :k].tolist(), vals[row, :k].tolist()))


class InContext:
    """Decodes output tokens as the text they add after ``prompt`` (SentencePiece drops a leading
    space when tokens are decoded alone; vLLM's text keeps it)."""

    def __init__(self, tok: Any, prompt: list[int]):
        self.tok, self.prompt = tok, list(prompt)
        self.head = len(tok.decode(self.prompt))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(self.prompt + list(ids))[self.head:]


def _sorts(settings: dict) -> bool:
    return settings["top_k"] > 0 or settings["top_p"] < 1.0


def _penalizes(settings: dict) -> bool:
    return (settings["repetition_penalty"] != 1.0 or settings["presence_penalty"] != 0.0
            or settings["frequency_penalty"] != 0.0)
