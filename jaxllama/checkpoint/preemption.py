"""SIGTERM -> "save at the next step boundary", agreed by every process.

TPU maintenance, GKE and SLURM announce preemption with SIGTERM. With one process we catch it in
Python and set a flag the loop polls after each step. With several, JAX's preemption sync manager
(started by ``jax.distributed.initialize``) catches the signal on any host and agrees on a step at
which all hosts stop, so they all take part in the same final checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """Context manager; ``reached(step)`` is True on every process at the step to save and stop at."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def __enter__(self) -> "PreemptionWatch":
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled
