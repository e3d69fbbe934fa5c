"""Multi-process failures: a dead peer, a peer that never arrives, bad environment, bad launcher input."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxllama.errors import ConfigError
from jaxllama.launch.local import free_port, launch, process_env
from jaxllama.parallel.distributed import cluster_detected, initialize_from_env

ARGS = ["model.preset=debug", "data.source=synthetic", "data.seq_len=32", "data.global_batch=8", "train.log_every=1",
        "train.tensorboard=false", "train.progress=false", "train.peak_flops=1e9", "mesh.data=2", "mesh.fsdp=4"]


def start(i: int, port: int, run_dir: Path, count: int = 2, **extra) -> subprocess.Popen:
    e = process_env({**os.environ, **extra}, i, count, port, devices=4)
    return subprocess.Popen([sys.executable, "-m", "jaxllama.cli", "train", *ARGS, "train.steps=100000",
                             f"run_dir={run_dir}"], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_peer_makes_the_other_exit_nonzero_within_60s(tmp_path):
    port, run = free_port(), tmp_path / "run"
    procs = [start(i, port, run) for i in range(2)]
    try:
        end = time.monotonic() + 300
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
            assert time.monotonic() < end, "the 2-process run did not start training"
            time.sleep(0.2)
        procs[1].kill()
        killed_at = time.monotonic()
        rc = procs[0].wait(timeout=90)
        took = time.monotonic() - killed_at
        assert rc != 0 and took < 60, f"exit {rc} after {took:.0f}s"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_peer_that_never_arrives_is_a_clear_error_not_a_hang(tmp_path):
    p = start(0, free_port(), tmp_path / "run", JAXLLAMA_DIST_TIMEOUT_S="5")  # process 1 never starts
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxllama: error: multi-process start-up: process 0 of 2 could not join coordinator "
                           "127.0.0.1:") and "within 5s" in last


@pytest.mark.parametrize("env, message", [
    ({"JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES not set"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two': expected an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"),
])
def test_bad_distributed_environment(monkeypatch, env, message):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        initialize_from_env()


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, True),  # inside srun with 4 tasks
    ({"SLURM_NTASKS": "4"}, False),  # the batch script itself, before srun
    ({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"JAXLLAMA_DISTRIBUTED": "auto"}, True),
    ({"JAXLLAMA_DISTRIBUTED": "off", "OMPI_COMM_WORLD_SIZE": "2"}, False),
])
def test_cluster_detection(monkeypatch, env, expected):
    for k in ("SLURM_NTASKS", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JAXLLAMA_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cluster_detected() is expected


def test_bad_distributed_mode(monkeypatch):
    monkeypatch.setenv("JAXLLAMA_DISTRIBUTED", "yes")
    with pytest.raises(ConfigError, match="JAXLLAMA_DISTRIBUTED='yes': expected auto or off"):
        cluster_detected()


def test_single_process_environment_is_a_no_op(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES", "JAXLLAMA_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    assert initialize_from_env() is False


def test_launcher_environment_and_bad_input():
    e = process_env({"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"}, 1, 3, 1234, 2)
    assert e["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234" and e["JAX_NUM_PROCESSES"] == "3"
    assert e["JAX_PROCESS_ID"] == "1" and e["JAX_PLATFORMS"] == "cpu"
    assert e["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
    with pytest.raises(ConfigError, match="command not found: no-such-command-xyz"):
        launch(["no-such-command-xyz"], 2)
    with pytest.raises(ConfigError, match="must be >= 1"):
        launch(["true"], 0)
    assert launch([sys.executable, "-c", "import os, sys; sys.exit(3 if os.environ['JAX_PROCESS_ID'] == '1' else 0)"],
                  2, grace_s=5) == 3  # a failing process's exit code is the launcher's
