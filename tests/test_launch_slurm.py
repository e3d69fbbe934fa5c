"""launch/slurm_gpu.sbatch run for real on this machine: 2 tasks on localhost form one JAX job.

``srun`` and ``scontrol`` are replaced by small stand-ins that do what SLURM does for a one-node,
two-task step: start the per-task command twice with the variables a real ``srun`` sets
(SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST, ...; the job-level ones come from the test as
``sbatch`` would set them), and record ``scontrol requeue``. Everything else -- the sbatch script,
launch/slurm_task.sh, `jaxllama train`, JAX's own SLURM detection (coordinator = first node of the
step, port derived from SLURM_JOB_ID), gloo collectives, the SIGTERM checkpoint -- is the real thing.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun for one node: SLURM_NTASKS copies of the command with srun's per-task variables, --label output.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  (
    set -o pipefail
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_ID=0 SLURM_STEPID=0 \
    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS \
    SLURM_NTASKS_PER_NODE=$SLURM_NTASKS SLURM_TASKS_PER_NODE=$SLURM_NTASKS \
      bash -c 'echo $$ > "$FAKE_SLURM_DIR/task$SLURM_PROCID.pid"; exec "$@"' task "$@" 2>&1 | sed -u "s/^/$i: /"
  ) &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM_DIR/scontrol.calls"
"""
ARGS = ["model.preset=debug", "data.source=synthetic", "data.seq_len=32", "data.global_batch=8", "train.steps=24", "train.log_every=1",
        "mesh.data=2", "mesh.fsdp=4", "checkpoint.every=0", "train.progress=false"]


def free_slurm_job_id() -> int:
    """A job id whose JAX-derived coordinator port (61440 + id % 4096) is free right now."""
    for _ in range(200):
        port = random.randrange(61440, 65536)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4096 * random.randrange(1, 1000) + port - 61440
    raise RuntimeError("no free port in 61440-65535")


def sbatch_env(tmp: Path, job_id: int, restarts: int) -> dict:
    bin_dir = tmp / "bin"
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp),
                SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="t", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
                SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1", SLURM_SUBMIT_DIR=str(ROOT),
                SLURM_RESTART_COUNT=str(restarts), JAXLLAMA_CMD=f"{sys.executable} -m jaxllama.cli",
                JAXLLAMA_RUNS=str(tmp / "runs"), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                XLA_FLAGS="--xla_force_host_platform_device_count=4")


def test_sbatch_runs_the_per_task_command_under_srun():
    text = (ROOT / "launch/slurm_gpu.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=TERM@" in text
    assert 'srun --kill-on-bad-exit=1 --label "$task_script"' in text
    for script in ("launch/slurm_gpu.sbatch", "launch/slurm_task.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


def test_two_slurm_tasks_form_one_job_train_and_requeue_after_preemption(tmp_path):
    (tmp_path / "bin").mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / "bin" / name).write_text(body)
        (tmp_path / "bin" / name).chmod(0o755)
    job_id = free_slurm_job_id()
    run_dir = tmp_path / "runs" / f"t-{job_id}"
    metrics = run_dir / "metrics.jsonl"
    cmd = ["bash", str(ROOT / "launch/slurm_gpu.sbatch"), *ARGS]

    # First allocation: SLURM's SIGTERM reaches both tasks after the first logged step.
    first = subprocess.Popen(cmd, env=sbatch_env(tmp_path, job_id, 0), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while not (metrics.exists() and metrics.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.1)
    for i in range(2):
        os.kill(int((tmp_path / f"task{i}.pid").read_text()), signal.SIGTERM)
    out1, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out1[-3000:]
    # One job: process 0 drives 8 devices although each process has 4 (only process 0 prints).
    assert "on 8 cpu device(s)" in out1, out1[-3000:]
    assert "0: preempted (SIGTERM) at step" in out1 and "1: jaxllama" not in out1
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", str(job_id)]
    stopped = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert stopped < 24

    # The requeued job (same job id, hence the same run dir) resumes and finishes.
    second = subprocess.run(cmd, env=sbatch_env(tmp_path, job_id, 1), capture_output=True, text=True, timeout=400)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-3000:]
    assert f"resumed from the checkpoint at step {stopped}" in out2 and "0: done: 24 steps" in out2, out2[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 25))
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", str(job_id)]  # not again
