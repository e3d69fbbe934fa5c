"""Ctrl-C: the first one stops the run cleanly, a second one exits at once.

The first SIGINT raises ``KeyboardInterrupt`` in the main thread, so the run finishes what it must (a
save in flight) and says so in one line. Inside :func:`deferred` (a checkpoint being handed to Orbax or
waited for) it is only recorded and raised when the block ends: Orbax catches an exception raised
inside its own waits, logs it with a traceback and leaves its finalize thread behind, so an interrupt
there would print a page of library tracebacks and could lose the save the user asked to keep.
A first SIGINT that lands where Python drops exceptions (a gc callback) is delivered again.
A second SIGINT, wherever it lands, exits the process at once with one line (a save cut short is a
temporary folder that resume skips).
"""

from __future__ import annotations

import contextlib
import functools
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


def _redeliver(unraisable, previous=sys.unraisablehook) -> None:
    """The first Ctrl-C can land in code whose exceptions Python prints and drops (a gc callback such as
    JAX's, a ``__del__``): it was lost, and a ``generate`` ran on to the end and exited 0. Deliver it
    again, so it stops the run like any other, and print nothing for it."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is _now:
        signal.signal(signal.SIGINT, _first)
        # From another thread and a moment later: raised here or synchronously, it would land in the
        # same dropping context again (the hook itself, the gc's next callback).
        threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    previous(unraisable)


def install() -> None:
    """Take over SIGINT in the main thread (unless something else already did, e.g. a test runner)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _first)
        sys.unraisablehook = functools.partial(_redeliver, previous=sys.unraisablehook)


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
