"""One training run per run dir: an exclusive lock on ``RUN_DIR/.lock``.

Two runs writing one run dir corrupt each other's checkpoints and interleave ``metrics.jsonl``.
The lock is an ``flock`` on a file holding the holder's host, pid and start time: the kernel drops
it when the holder dies (even by SIGKILL), so there are no stale locks to clean, and the file's text
lets the refusal name who holds it. A multi-process job takes it once, on process 0. On object stores
(``gs://``) there is no such lock: none is taken, and the README says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jaxllama.errors import ConfigError

LOCK_FILE = ".lock"


class RunLock:
    """Context manager holding the run dir's lock; ``acquire`` raises a one-line ConfigError when held."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if "://" in str(self.path):
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"run_dir {self.path.parent}: cannot create its lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"run_dir {self.path.parent} is in use by another run ({self._holder()}): one run per "
                              "run dir; wait for it to end, or choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dict(host=socket.gethostname(), pid=os.getpid(),
                                     since=time.strftime("%Y-%m-%d %H:%M:%S"))).encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text() or "{}")
            return f"pid {h['pid']} on {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"see {self.path}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (its text is only informative)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
