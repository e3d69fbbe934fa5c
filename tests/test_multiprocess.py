"""Two processes x 4 CPU devices (jax.distributed + gloo) train, are stopped, resume, and match one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxllama.config import load_config
from jaxllama.train.loop import train

ARGS = ["model.preset=debug", "data.source=synthetic", "data.seq_len=32", "data.global_batch=8", "train.log_every=1",
        "train.tensorboard=false", "train.progress=false", "train.peak_flops=1e9", "train.seed=7",
        "mesh.data=2", "mesh.fsdp=4", "train.steps=12", "checkpoint.every=3"]


def launch_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "jaxllama.launch.local", "2", "--devices-per-process", "4", "--",
            sys.executable, "-m", "jaxllama.cli", "train", *ARGS, f"run_dir={run_dir}"]


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    return {**clean, "JAX_PLATFORMS": "cpu"}


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows}


def test_two_processes_stop_resume_and_match_one_process(tmp_path):
    run = tmp_path / "two"
    proc = subprocess.Popen(launch_cmd(run), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 300
    while len(losses(run)) < 2:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < end, "2-process run did not start training"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it; the processes agree on a step, save, exit 0
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(losses(run))
    assert stopped < 12 and f"preempted (SIGTERM) at step {stopped}" in out
    assert "[process 1] step" not in out  # only process 0 logs
    files = sorted(p.name for p in (run / "checkpoints" / str(stopped) / "data").glob("process_*"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]  # every process's data position

    resumed = subprocess.run(launch_cmd(run), env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from the checkpoint at step {stopped}" in resumed.stdout
    two = losses(run)

    cfg = load_config(None, [*ARGS, f"run_dir={tmp_path / 'one'}"])  # 1 process x 8 devices, same mesh shape
    one = {r["step"]: r["loss"] for r in train(cfg, out=lambda _: None)["history"]}
    assert sorted(two) == sorted(one) == list(range(1, 13))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=0, atol=1e-5)


def test_two_processes_train_lora_like_one_process(tmp_path):
    """LoRA (adapters, dropout, QLoRA int8 base from the seed) over 2 processes x 4 devices matches 1 x 8."""
    lora = ["train.lora.rank=4", "train.lora.dropout=0.1", "train.lora.quantize=int8", "train.steps=4",
            "checkpoint.enabled=false"]
    cmd = [sys.executable, "-m", "jaxllama.launch.local", "2", "--devices-per-process", "4", "--", sys.executable,
           "-m", "jaxllama.cli", "train", *ARGS, *lora, f"run_dir={tmp_path / 'two'}"]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    two = losses(tmp_path / "two")
    one = {h["step"]: h["loss"] for h in train(load_config(None, [*ARGS, *lora, f"run_dir={tmp_path / 'one'}"]),
                                               out=lambda _: None)["history"]}
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=0, atol=1e-5)
