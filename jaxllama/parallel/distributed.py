"""Multi-process start-up: ``jax.distributed.initialize`` from the environment, with a clear timeout.

One entry point, :func:`initialize_from_env`, called by ``jaxllama train`` before JAX touches a
device. It reads the standard variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, optional ``JAX_LOCAL_DEVICE_IDS``); without them it leaves the cluster to JAX's
own detection (SLURM, Open MPI, Cloud TPU pods) when that environment shows more than one process,
and otherwise does nothing (a single-process run); ``JAXLLAMA_DISTRIBUTED=auto|off`` forces or
disables joining. On CPU, cross-process collectives go through
gloo. A peer that does not arrive within ``timeout_s`` gives a :class:`RunError` naming the
coordinator, not a hang; a peer that dies later is noticed by the coordination service's heartbeat
(``heartbeat_s``), and the survivors exit non-zero.
"""

from __future__ import annotations

import os
import sys
import threading

import jax

from jaxllama.errors import ConfigError, RunError, first_line

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_TIMEOUT = "JAXLLAMA_DIST_TIMEOUT_S"  # overrides timeout_s (launchers may set it)
ENV_HEARTBEAT = "JAXLLAMA_DIST_HEARTBEAT_S"
ENV_MODE = "JAXLLAMA_DISTRIBUTED"  # auto: let JAX detect the cluster; off: never initialize


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer") from None


def cluster_detected() -> bool:
    """True when the environment describes several processes for JAX's own cluster detection.

    SLURM (inside ``srun``: ``SLURM_STEP_ID``), Open MPI, or a TPU pod whose worker list has several
    hosts. ``JAXLLAMA_DISTRIBUTED=auto`` forces detection (e.g. a TPU pod known only through its
    metadata server); ``JAXLLAMA_DISTRIBUTED=off`` disables it.
    """
    env = os.environ
    mode = env.get(ENV_MODE, "").lower()
    if mode in ("off", "auto"):
        return mode == "auto"
    if mode:
        raise ConfigError(f"environment variable {ENV_MODE}={env[ENV_MODE]!r}: expected auto or off")
    if (_int_env("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_ID" in env:
        return True
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_from_env(timeout_s: int = 300, heartbeat_s: int = 30) -> bool:
    """Join the multi-process job the environment describes; returns True when one was joined.

    Must run before anything creates a JAX backend (device queries, arrays). Idempotent.
    """
    if jax.distributed.is_initialized():
        return True
    if os.environ.get(ENV_MODE, "").lower() == "off":
        return False
    timeout_s = _int_env(ENV_TIMEOUT) or timeout_s
    heartbeat_s = _int_env(ENV_HEARTBEAT) or heartbeat_s
    address = os.environ.get(ENV_ADDRESS) or None
    count, pid = _int_env(ENV_COUNT), _int_env(ENV_ID)
    explicit = address is not None or count is not None or pid is not None
    if not explicit and not cluster_detected():
        return False
    if explicit:
        missing = [n for n, v in ((ENV_ADDRESS, address), (ENV_COUNT, count), (ENV_ID, pid)) if v is None]
        if missing:
            raise ConfigError(f"multi-process start-up: {', '.join(missing)} not set "
                              f"(set {ENV_ADDRESS}, {ENV_COUNT} and {ENV_ID} together)")
        if count < 1 or not 0 <= pid < count:
            raise ConfigError(f"multi-process start-up: {ENV_ID}={pid} must be in [0, {ENV_COUNT}={count})")
        if count == 1:
            return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local_ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    kwargs = dict(coordinator_address=address, num_processes=count, process_id=pid,
                  local_device_ids=[int(x) for x in local_ids.split(",")] if local_ids else None,
                  initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_s)
    who = f"process {pid} of {count}" if explicit else "this process"
    where = f"coordinator {address}" if address else "the coordinator chosen by cluster auto-detection"
    message = (f"multi-process start-up: {who} could not join {where} within {timeout_s}s "
               f"(a peer did not start, or the address is wrong)")
    # JAX's own timeout aborts the process from C++ with a stack dump; our watchdog fires first
    # with one readable line. JAX's deadline stays as a backstop.
    kwargs["initialization_timeout"] = timeout_s + 30
    watchdog = threading.Timer(timeout_s, _give_up, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX raises XlaRuntimeError / RuntimeError with long texts
        first = first_line(e, 200)
        raise RunError(f"{message}: {first}") from None
    finally:
        watchdog.cancel()
    return True


def _give_up(message: str) -> None:
    """Watchdog: the peers did not arrive; print the reason and leave now (JAX would block, then abort)."""
    print(f"jaxllama: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def exit_if_peer_failed(error: BaseException) -> None:
    """In a multi-process job, turn a failed collective into one line and an immediate exit 1.

    When a peer dies, gloo fails the next collective here. Exiting normally would then wait in
    JAX's shutdown barrier for the dead peer until the heartbeat timeout and abort; ``os._exit``
    skips that, so the survivors stop within seconds. Does nothing in a single-process run.
    """
    if not jax.distributed.is_initialized() or not isinstance(error, jax.errors.JaxRuntimeError):
        return
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    print(f"jaxllama: error: process {jax.process_index()}: a collective failed, another process probably "
          f"died ({first})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
