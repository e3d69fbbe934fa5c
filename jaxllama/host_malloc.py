"""Keep freed host memory in the process, so XLA:CPU's per-step temporaries are not faulted in anew.

Why: XLA:CPU allocates a program's temporaries as one buffer per execution (221 MB for the ``tiny``
preset at seq 256 x batch 8) and frees it afterwards. The execution runs on a runtime thread, whose
glibc arena cannot hold a chunk that large, so glibc ``mmap``s it fresh every step and ``munmap``s it
after: 54,000 page faults and ~170 ms of kernel time a step, each page zeroed again by the kernel
(measured with ``getrusage``; ``tests/test_host_malloc.py`` checks the effect). One arena that grows by
``brk`` and is never trimmed lets the next step reuse the same, already mapped pages. It is what
glibc's ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do, set through
``mallopt`` so that ``jaxllama`` needs no wrapper script; MaxText's images get the same effect from
tcmalloc (``LD_PRELOAD``).

The price: memory freed by the process stays with the process (reused by it, not returned to the
system), so a host's resident size stays at its peak. On a host with an accelerator the step's
temporaries live in device memory and host ``malloc`` is left alone. ``JAXLLAMA_HOST_MALLOC``:
``auto`` (default: keep on hosts without an accelerator), ``keep`` or ``default`` (glibc's own).

Call it first thing, before numpy or JAX start threads: a thread gets its arena at its first
``malloc``, and threads that already have one of their own keep it.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

from jaxllama.errors import ConfigError

# glibc <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ("auto", "keep", "default")

# The same settings as environment variables, for peers run as subprocesses in a benchmark, so that
# both sides of a comparison run with one allocator behaviour (glibc reads these at start-up).
ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}


def has_accelerator() -> bool:
    """A TPU (``/dev/accel*``, ``/dev/vfio/N``), NVIDIA (``/dev/nvidia0``...) or AMD (``/dev/kfd``)
    device node: the same probe the CLI uses before JAX starts, as JAX's own backends would load."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*")
                or os.path.exists("/dev/kfd"))


def keep_freed_memory(setting: str | None = None) -> bool:
    """Apply the settings above when ``setting`` (default: ``$JAXLLAMA_HOST_MALLOC``, else ``auto``)
    asks for it; True when applied. Off Linux/glibc (macOS, musl) it does nothing and says False."""
    setting = setting if setting is not None else os.environ.get("JAXLLAMA_HOST_MALLOC", "auto")
    if setting not in _SETTINGS:
        raise ConfigError(f"JAXLLAMA_HOST_MALLOC={setting!r}: expected one of {', '.join(_SETTINGS)}")
    if setting == "default" or (setting == "auto" and has_accelerator()) or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. -1 as the trim threshold is SIZE_MAX once glibc widens it: never trim.
    return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
