"""Temporary folders that record who made them, so a later run can remove those whose maker died.

SIGKILL (and SIGTERM's default action) end a process without running ``finally`` or ``atexit``,
so a conversion's hidden ``.DST.tmp-*`` folder, or the tokenizer folder rebuilt from a GGUF,
would otherwise stay forever. Each folder made here holds :data:`OWNER` (pid, the process's start
time, host name, boot id and pid namespace). :func:`sweep_stale` removes a folder only when that
record proves its maker is gone: same host, same boot and same pid namespace (else a pid means
nothing here, and the folder is left alone), and no live process with that pid and start time.
Folders without a readable record (other programs', older jaxllama's) are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

OWNER = ".jaxllama-owner.json"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """Linux: the process's start time in clock ticks since boot (field 22 of /proc/PID/stat), else None."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _machine() -> dict:
    """What must match before a recorded pid can be judged: host, boot, pid namespace."""
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"),
            "pidns": _pid_namespace()}


def make_owned_dir(prefix: str, parent: Path) -> Path:
    """``tempfile.mkdtemp`` plus the owner record (raises OSError when ``parent`` is not writable)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    record = {"pid": os.getpid(), "start": _start_time(os.getpid()), **_machine()}
    try:
        (tmp / OWNER).write_text(json.dumps(record))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _owner_gone(record: dict) -> bool:
    if {k: record.get(k) for k in ("host", "boot", "pidns")} != _machine():
        return False  # another machine, boot or pid namespace: its pids cannot be checked from here
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    start = _start_time(pid)
    return record.get("start") is not None and start is not None and start != record["start"]  # pid reused


def sweep_stale(parent: Path, pattern: str) -> list[Path]:
    """Remove the folders matching ``pattern`` in ``parent`` whose recorded owner is gone; returns them."""
    removed = []
    try:
        candidates = list(Path(parent).glob(pattern))
    except OSError:
        return removed
    for d in candidates:
        try:
            record = json.loads((d / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and d.is_dir() and not d.is_symlink() and _owner_gone(record):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
