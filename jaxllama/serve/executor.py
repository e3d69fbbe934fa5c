"""Runs the server's device steps, on one process or in step on several.

With several processes (a model sharded over hosts), process 0 serves HTTP and schedules; before each
step it broadcasts what the step is (a fixed-size header, then the step's arguments) and every
process runs the same jitted call on its shards (:func:`follow` is the other processes' loop). Idle,
process 0 sends a no-op about once a second, so the others never sit in one collective for long.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxllama.serve.slots import FLOAT_FIELDS, INT_FIELDS, Flags, SlotProgram, decode_step, prefill_chunk, window

STOP, IDLE, PREFILL, DECODE = 0, 1, 2, 3
FLAG_NAMES = [f.name for f in dataclasses.fields(Flags)]
HEADER = 4 + len(FLAG_NAMES)  # op, slot, start, last, flags...


def _broadcast(tree):
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


class Executor:
    """The state (KV cache, penalties' token sets) and the two steps; ``shared``: several processes."""

    def __init__(self, params, prog: SlotProgram):
        self.params, self.prog = params, prog
        self.shared = jax.process_count() > 1
        self.state = jax.jit(prog.empty_state)()

    def _header(self, op: int, slot: int = 0, start: int = 0, last: int = 0, flags: Flags = Flags()) -> None:
        if self.shared:
            _broadcast(np.asarray([op, slot, start, last, *(int(getattr(flags, k)) for k in FLAG_NAMES)], np.int32))

    def prefill(self, slot: int, tokens: np.ndarray, start: int, last: int, targets: np.ndarray,
                floats: np.ndarray, ints: np.ndarray, flags: Flags) -> dict:
        self._header(PREFILL, slot, start, last, flags)
        if self.shared:
            tokens, targets, floats, ints = _broadcast((tokens, targets, floats, ints))
        return self._prefill(slot, tokens, start, last, targets, floats, ints, flags)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, active: np.ndarray, floats: np.ndarray,
               ints: np.ndarray, flags: Flags) -> dict:
        self._header(DECODE, flags=flags)
        if self.shared:
            tokens, positions, active, floats, ints = _broadcast((tokens, positions, active.astype(np.int32),
                                                                  floats, ints))
        return self._decode(tokens, positions, active, floats, ints, flags)

    def reset(self) -> None:
        """A fresh state after a failed step (whose donated state may be gone)."""
        self.state = jax.jit(self.prog.empty_state)()

    def idle(self) -> None:
        self._header(IDLE)

    def close(self) -> None:
        self._header(STOP)

    def _prefill(self, slot, tokens, start, last, targets, floats, ints, flags) -> dict:
        self.state, out = prefill_chunk(self.params, self.state, np.int32(slot), tokens, np.int32(start),
                                        np.int32(last), targets, floats, ints, prog=self.prog, flags=flags,
                                        window=window(self.prog, start + self.prog.chunk))
        return jax.device_get(out)

    def _decode(self, tokens, positions, active, floats, ints, flags) -> dict:
        active = np.asarray(active, bool)
        needed = int(positions[active].max()) + 1 if active.any() else 1
        self.state, out = decode_step(self.params, self.state, tokens, positions, active, floats, ints, prog=self.prog,
                                      flags=flags, window=window(self.prog, needed))
        return jax.device_get(out)


def follow(ex: Executor) -> None:
    """A process other than 0: run every step process 0 announces, until it stops."""
    c, s = ex.prog.chunk, ex.prog.slots
    nf, ni = len(FLOAT_FIELDS), len(INT_FIELDS)
    while True:
        head = _broadcast(np.zeros((HEADER,), np.int32))
        op, slot, start, last = (int(x) for x in head[:4])
        flags = Flags(**{k: bool(v) for k, v in zip(FLAG_NAMES, head[4:])})
        if op == STOP:
            return
        if op == PREFILL:
            args = _broadcast((np.zeros((c,), np.int32), np.zeros((c,), np.int32), np.zeros((1, nf), np.float32),
                               np.zeros((1, ni), np.int32)))
            ex._prefill(slot, args[0], start, last, args[1], args[2], args[3], flags)
        elif op == DECODE:
            z = np.zeros((s,), np.int32)
            args = _broadcast((z, z, z, np.zeros((s, nf), np.float32), np.zeros((s, ni), np.int32)))
            ex._decode(*args, flags)
