"""launch/tpu_pod.sh: the commands its --dry-run prints, and its real control flow against a stand-in gcloud.

The stand-in ``gcloud`` runs ``tpu-vm ssh --worker=i --command C`` as ``bash -c C`` locally with
HOME=<tmp>/w<i> (``--worker=all``: every worker in turn), which is what the real one does on the
worker VMs; so the test sees the script start one command per worker, collect each worker's log,
and stop the others when one fails.
"""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch/tpu_pod.sh"
TRAIN = ["jaxllama", "train", "--config", "configs/llama3-8b.yaml", "run_dir=gs://bucket/runs/l3 8b", "train.steps=10"]

FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_TPU_DIR/gcloud.calls"
if [[ "$1 $2 $3 $4" == "compute tpus tpu-vm describe" ]]; then echo 10.1.2.3; exit 0; fi
[[ "$1 $2 $3 $4" == "compute tpus tpu-vm ssh" ]] || exit 0
worker="" command=""
while [[ $# -gt 0 ]]; do
  case $1 in --worker=*) worker=${1#--worker=} ;; --command) command=$2; shift ;; esac
  shift
done
if [[ $worker == all ]]; then
  for ((i = 0; i < FAKE_TPU_WORKERS; i++)); do HOME=$FAKE_TPU_DIR/w$i bash -c "$command"; done
else
  HOME=$FAKE_TPU_DIR/w$worker exec bash -c "$command"
fi
"""


def sh(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[1:]) for line in stdout.splitlines() if line.startswith("+ ")]


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_dry_run_prints_create_install_run_and_stop_for_a_v5p_64():
    p = sh("--dry-run", "--tpu", "pod", "--zone", "us-east5-a", "--project", "proj", "--create",
           "--accelerator-type", "v5p-64", "--runtime-version", "v2-alpha-tpuv5", "--spot",
           "--env", "WANDB_MODE=offline", "--", *TRAIN)
    assert p.returncode == 0, p.stderr
    cmds = commands(p.stdout)
    create = cmds[0]
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and "--spot" in create
    assert option(create, "--node-id") == "pod" and option(create, "--accelerator-type") == "v5p-64"
    assert option(create, "--runtime-version") == "v2-alpha-tpuv5" and option(create, "--project") == "proj"
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    scp = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    assert len(scp) == 1 and "--worker=all" in scp[0]
    install, *runs, stop = ssh
    assert "--worker=all" in install and "pip install" in option(install, "--command")
    assert "jax[tpu]>=0.10,<0.12" in option(install, "--command")  # the same range as pyproject.toml
    # v5p-64 = 32 chips = 8 hosts: one ssh per worker, each running exactly the user's command.
    assert [c[6] for c in runs] == [f"--worker={i}" for i in range(8)]
    for i, c in enumerate(runs):
        remote = shlex.split(option(c, "--command"))
        assert remote[-len(TRAIN):] == TRAIN and "WANDB_MODE=offline" in remote
        assert option(c, "--zone") == "us-east5-a"
        # jax.distributed start-up: worker 0 coordinates, the process id is the worker number.
        assert {"JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476", "JAX_NUM_PROCESSES=8", f"JAX_PROCESS_ID={i}"} <= set(remote)
    assert "networkEndpoints[0].ipAddress" in p.stdout  # how WORKER0_IP is found
    assert "--worker=all" in stop and "kill -TERM" in option(stop, "--command")


@pytest.mark.parametrize("accel, hosts", [("v5p-8", 1), ("v5p-128", 16), ("v4-32", 4), ("v5litepod-16", 4),
                                          ("v5litepod-8", 1), ("v6e-256", 64)])
def test_hosts_follow_the_accelerator_type(accel, hosts):
    p = sh("--dry-run", "--no-install", "--tpu", "t", "--zone", "z", "--accelerator-type", accel, "--", *TRAIN)
    assert p.returncode == 0, p.stderr
    assert len([c for c in commands(p.stdout) if "--worker=all" not in c]) == hosts


@pytest.mark.parametrize("args, word", [
    (["--zone", "z", "--workers", "2", "--", *TRAIN], "--tpu"),
    (["--tpu", "t", "--workers", "2", "--", *TRAIN], "--zone"),
    (["--tpu", "t", "--zone", "z", "--workers", "2"], "no command"),
    (["--tpu", "t", "--zone", "z", "--worker", "2", "--", *TRAIN], "unknown option '--worker'"),
    (["--tpu", "t", "--zone", "z", "--workers", "0", "--", *TRAIN], "--workers"),
    (["--tpu", "t", "--zone", "z", "--accelerator-type", "v9-8", "--", *TRAIN], "--accelerator-type 'v9-8'"),
    (["--tpu", "t", "--zone", "z", "--create", "--accelerator-type", "v5p-8", "--", *TRAIN], "--runtime-version"),
    (["--tpu", "t", "--zone", "z", "--env", "NOEQUALS", "--", *TRAIN], "--env"),
    (["--tpu", "t", "--zone", "z", "--", *TRAIN], "--workers"),
])
def test_bad_input_is_one_line_and_exit_2(args, word):
    p = sh("--dry-run", *args)
    out = (p.stdout + p.stderr).strip()
    assert p.returncode == 2 and len(out.splitlines()) == 1 and word in out, out


@pytest.fixture
def fake_pod(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/gcloud").write_text(FAKE_GCLOUD)
    (tmp_path / "bin/gcloud").chmod(0o755)
    for i in range(3):
        (tmp_path / f"w{i}/jaxllama").mkdir(parents=True)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_TPU_DIR=str(tmp_path),
               FAKE_TPU_WORKERS="3")
    return tmp_path, env


def test_every_worker_runs_the_command_and_logs_it(fake_pod):
    tmp, env = fake_pod
    logs = tmp / "logs"
    p = sh("--tpu", "t", "--zone", "z", "--workers", "3", "--no-install", "--logs", str(logs),
           "--env", "GREETING=hello there", "--", "bash", "-c",
           'echo "$GREETING from $HOME in $PWD: $JAX_PROCESS_ID of $JAX_NUM_PROCESSES via $JAX_COORDINATOR_ADDRESS"',
           env=env)
    assert p.returncode == 0, p.stderr
    for i in range(3):
        assert (logs / f"worker-{i}.log").read_text().strip() == \
            f"hello there from {tmp}/w{i} in {tmp}/w{i}/jaxllama: {i} of 3 via 10.1.2.3:8476"


def test_one_failing_worker_stops_all_and_its_code_is_returned(fake_pod):
    tmp, env = fake_pod
    (tmp / "w1/fail").touch()
    logs = tmp / "logs"
    start = time.monotonic()
    p = sh("--tpu", "t", "--zone", "z", "--workers", "3", "--no-install", "--logs", str(logs), "--",
           "bash", "-c", 'if [[ -f ~/fail ]]; then sleep 1; echo boom; exit 3; fi; '
                         'echo training; sleep 300 & trap "echo got SIGTERM, saving; kill $!; exit 0" TERM; wait',
           env=env, timeout=120)
    assert p.returncode == 3, p.stderr
    assert time.monotonic() - start < 60  # the others did not run their 300 s
    assert "worker 1 failed (exit 3)" in p.stderr and "boom" in p.stderr
    assert (logs / "worker-1.log").read_text().strip() == "boom"
    for i in (0, 2):
        assert (logs / f"worker-{i}.log").read_text().split("\n")[:2] == ["training", "got SIGTERM, saving"]
    calls = (tmp / "gcloud.calls").read_text().splitlines()
    assert sum("--worker=all" in c and "kill -TERM" in c for c in calls) == 1
