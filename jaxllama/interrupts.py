"""Ctrl-C: the first one stops the run cleanly, a second one exits at once.

The first SIGINT raises ``KeyboardInterrupt`` in the main thread, so the run finishes what it must (a
save in flight) and says so in one line. Inside :func:`deferred` (a checkpoint being handed to Orbax or
waited for) it is only recorded and raised when the block ends: Orbax catches an exception raised
inside its own waits, logs it with a traceback and leaves its finalize thread behind, so an interrupt
there would print a page of library tracebacks and could lose the save the user asked to keep.
A second SIGINT, wherever it lands, exits the process at once with one line (a save cut short is a
temporary folder that resume skips).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT

_depth = 0  # nesting of deferred() blocks in the main thread
_pending = False  # a first Ctrl-C arrived inside one


def _now(signum, frame) -> None:
    print("jaxllama: interrupted again: exiting now", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(INTERRUPTED)


def _first(signum, frame) -> None:
    global _pending
    signal.signal(signal.SIGINT, _now)
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


def install() -> None:
    """Take over SIGINT in the main thread (unless something else already did, e.g. a test runner)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _first)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a first Ctrl-C until the block ends (then raise it); a second still exits at once.
    Outside the main thread signals cannot arrive, so the block is a no-op there."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            _pending = False
            raise KeyboardInterrupt
