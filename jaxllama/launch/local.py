"""``python -m jaxllama.launch.local N [options] -- jaxllama train ...``: N processes on 127.0.0.1.

Each process gets ``JAX_COORDINATOR_ADDRESS`` (a free local port), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``, so ``jaxllama``'s :func:`~jaxllama.parallel.distributed.initialize_from_env`
joins them into one job, and ``--devices-per-process`` simulated CPU devices (default: 8 / N, so the
job has the 8 devices the tests use). Together they form one N x M device mesh with gloo
collectives: the real multi-controller code path, on one machine.

Process 0's output passes through; the others' lines are prefixed ``[process i]``. SIGTERM/SIGINT
are forwarded to every process (which then save a checkpoint and exit). When a process fails, the
others are given ``--grace`` seconds to notice and exit by themselves, then killed; the launcher
exits with the first failure's code.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxllama.errors import ConfigError

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], index: int, count: int, port: int, devices: int) -> dict[str, str]:
    """The environment of process ``index``: coordinator variables, CPU platform, device count."""
    env = dict(base)
    flags = re.sub(rf"{DEVICE_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index),
               XLA_FLAGS=f"{flags} {DEVICE_FLAG}={devices}".strip(), JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))
    return env


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.flush()


def launch(command: list[str], count: int, devices: int | None = None, port: int | None = None,
           grace_s: float = 60.0) -> int:
    """Run ``command`` as ``count`` cooperating processes; returns 0 or the first non-zero exit code."""
    if count < 1:
        raise ConfigError(f"number of processes: must be >= 1, got {count}")
    if not command:
        raise ConfigError("no command given: usage `... local N -- jaxllama train ...`")
    devices = devices or max(1, 8 // count)
    port = port or free_port()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for i in range(count):
        env = process_env(dict(os.environ), i, count, port, devices)
        out = None if i == 0 else subprocess.PIPE
        try:
            p = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if i else None)
        except FileNotFoundError:
            raise ConfigError(f"command not found: {command[0]}") from None
        procs.append(p)
        if out is not None:
            t = threading.Thread(target=_pump, args=(p.stdout, f"[process {i}] "), daemon=True)
            t.start()
            pumps.append(t)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed_at, code = None, 0
        while any(p.poll() is None for p in procs):
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad and failed_at is None:
                failed_at, code = time.monotonic(), bad[0]
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        for t in pumps:
            t.join(timeout=5)
        codes = [p.returncode for p in procs]
        return code or next((c for c in codes if c), 0)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m jaxllama.launch.local N [--devices-per-process M] [--port P] [--grace S] "
              "-- jaxllama train ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="jaxllama.launch.local",
                                     description="Start N cooperating jaxllama processes on this machine.")
    parser.add_argument("processes", type=int, help="number of processes")
    parser.add_argument("--devices-per-process", type=int, help="simulated CPU devices per process (default 8/N)")
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds the others get to exit after one process fails (default 60)")
    args = parser.parse_args(argv[:split])
    try:
        return launch(argv[split + 1:], args.processes, args.devices_per_process, args.port, args.grace)
    except ConfigError as e:
        print(f"jaxllama.launch.local: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
