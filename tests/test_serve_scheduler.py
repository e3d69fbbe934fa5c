"""The continuous-batching scheduler's bookkeeping, with a recording stand-in for the device steps
(the real steps are checked end to end against transformers in test_serve.py): chunked prefill,
slot reuse, finish reasons, cancellation, the queue limit, and a failed step ending only its sequences."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from jaxllama.infer.generate import TextStops
from jaxllama.serve.scheduler import DEFAULT_SETTINGS, QueueFull, Scheduler, Sequence


class Letters:
    """Token t is the letter chr(97 + t % 26)."""

    def decode(self, ids):
        return "".join(chr(97 + t % 26) for t in ids)


class FakeSteps:
    """Next token = (last fed token + 1) % 26; records every call; can fail once on demand."""

    def __init__(self, slots=2, max_len=32, chunk=4):
        self.prog = SimpleNamespace(slots=slots, max_len=max_len, chunk=chunk)
        self.calls, self.fail_next, self.resets = [], False, 0

    def _maybe_fail(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost\nsecond line")

    def prefill(self, slot, tokens, start, last, targets, floats, ints, flags):
        self.calls.append(("prefill", slot, start, last))
        self._maybe_fail()
        return dict(token=np.int32((tokens[last] + 1) % 26), logprob=np.float32(-1.0), top=None,
                    score=np.full((len(tokens),), -2.0, np.float32))

    def decode(self, tokens, positions, active, floats, ints, flags):
        self.calls.append(("decode", tuple(np.flatnonzero(active)), tuple(positions[active])))
        self._maybe_fail()
        return dict(token=((tokens + 1) % 26).astype(np.int32), logprob=np.full(tokens.shape, -0.5, np.float32),
                    top=None)

    def reset(self):
        self.resets += 1

    def idle(self):
        pass

    def close(self):
        pass


def seq(prompt, max_tokens=5, stop_ids=(), stops=(), events=None, **kw):
    settings = {k: v for k, v in DEFAULT_SETTINGS.items() if k != "step"}
    out = Sequence(prompt=list(prompt), max_tokens=max_tokens, settings=settings, stops=TextStops(Letters(), stops),
                   stop_ids=frozenset(stop_ids), **kw)
    if events is not None:
        out.emit = events.append
    return out


def drain(sched, limit=200):
    for _ in range(limit):
        if not sched.step():
            return
    raise AssertionError("the scheduler never went idle")


def test_chunked_prefill_then_decode_positions():
    steps = FakeSteps(chunk=4)
    sched = Scheduler(steps)
    events = []
    s = seq(range(10), max_tokens=3, events=events)
    sched.submit([s])
    drain(sched)
    prefills = [c for c in steps.calls if c[0] == "prefill"]
    assert prefills == [("prefill", 0, 0, 3), ("prefill", 0, 4, 3), ("prefill", 0, 8, 1)]
    decodes = [c for c in steps.calls if c[0] == "decode"]
    assert decodes == [("decode", (0,), (10,)), ("decode", (0,), (11,))]  # the newest token at its position
    assert s.tokens == [10, 11, 12] and s.finish_reason == "length"
    assert "".join(e["text"] for e in events) == "klm" and events[-1]["final"]
    assert sched.slots == [None, None]


def test_slots_are_reused_and_a_long_prompt_interleaves_with_decoding():
    steps = FakeSteps(slots=2, chunk=4)
    sched = Scheduler(steps)
    a, b, c = seq([1], max_tokens=6), seq(range(12), max_tokens=2), seq([3], max_tokens=2)
    sched.submit([a, b, c])
    drain(sched)
    assert all(x.finish_reason == "length" for x in (a, b, c))
    assert c.slot == b.slot or c.slot == a.slot  # the third waited and took a freed slot
    # while b's 12-token prompt was prefilled (3 chunks), a kept decoding: each iteration did both
    first_b = next(i for i, x in enumerate(steps.calls) if x[:2] == ("prefill", 1))
    assert steps.calls[first_b + 1][0] == "decode" and 0 in steps.calls[first_b + 1][1]


def test_stop_ids_stop_strings_and_context_end():
    steps = FakeSteps(max_len=16)
    sched = Scheduler(steps)
    by_id = seq([0], max_tokens=10, stop_ids={3})  # 1, 2, then 3 is a stop id: not included
    by_text = seq([0], max_tokens=10, stops=["de"])  # b c d e -> text cut before "de"
    full = seq(range(14), max_tokens=10)  # 14 + 2 = the 16-position context
    sched.submit([by_id, by_text])
    drain(sched)
    sched.submit([full])
    drain(sched)
    assert by_id.tokens == [1, 2] and by_id.finish_reason == "stop"
    assert by_text.text() == "bc" and by_text.finish_reason == "stop"
    assert len(full.tokens) == 2 and full.finish_reason == "length"


def test_cancelled_sequences_leave_and_the_queue_is_bounded():
    steps = FakeSteps(slots=1)
    sched = Scheduler(steps, max_queue=2)
    a, b = seq([1], max_tokens=20), seq([2], max_tokens=2)
    sched.submit([a, b])
    with pytest.raises(QueueFull):
        sched.submit([seq([3])])
    sched.step()
    sched.cancel([a])
    drain(sched)
    assert a.finish_reason is None and b.finish_reason == "length" and len(a.tokens) < 20
    assert sched.load()["cancelled"] == 1 and sched.load()["rejected"] == 1


def test_a_failed_step_ends_its_sequences_with_an_error_and_serving_goes_on():
    steps = FakeSteps(slots=2)
    sched = Scheduler(steps)
    events = []
    a = seq([1], max_tokens=4, events=events)
    steps.fail_next = True
    engine = threading.Thread(target=sched.run, daemon=True)
    engine.start()
    try:
        sched.submit([a])
        wait_for(lambda: a.finish_reason is not None)
        assert a.finish_reason == "error" and events[-1]["error"] == "RuntimeError: device lost"  # one line
        assert steps.resets == 1
        b = seq([5], max_tokens=2)
        sched.submit([b])
        wait_for(lambda: b.finish_reason is not None)
        assert b.tokens == [6, 7] and b.finish_reason == "length"
    finally:
        sched.stop()
        engine.join(timeout=10)
    assert not engine.is_alive()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
