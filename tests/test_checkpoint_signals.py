"""The CLI under signals: SIGTERM saves and exits 0; SIGKILL during a save never costs the last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxllama.checkpoint import load_params
from jaxllama.checkpoint.params import complete_steps

ARGS = ["model.preset=debug", "data.source=synthetic", "data.seq_len=32", "data.global_batch=8", "train.log_every=1",
        "train.tensorboard=false", "train.progress=false", "train.peak_flops=1e9"]


def cli(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jaxllama.cli", "train", *ARGS, f"run_dir={run_dir}", *overrides]


def env() -> dict:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip().endswith("}")]


def wait_for(cond, proc: subprocess.Popen, timeout: float = 240.0, every: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"training exited early ({proc.returncode}): {proc.stdout.read()[-2000:]}"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(every)


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(cli(run, "train.steps=100000", "checkpoint.every=100000"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(logged_steps(run)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    last = logged_steps(run)[-1]
    assert f"preempted (SIGTERM) at step {last}: checkpoint saved and complete" in out
    assert complete_steps(run / "checkpoints") == [last]  # the only save: the one SIGTERM asked for
    params, model_cfg = load_params(str(run))
    assert model_cfg.preset == "debug" and params["norm"]["scale"].shape == (64,)


def test_sigkill_during_a_save_then_resume(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    args = ("train.steps=14", "checkpoint.every=1", "checkpoint.keep=1")
    proc = subprocess.Popen(cli(run, *args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def saving() -> bool:  # a save is in flight: Orbax's temporary directory exists
        return len(logged_steps(run)) >= 3 and ckpt.is_dir() and any(".orbax-checkpoint-tmp" in p.name
                                                                       for p in ckpt.iterdir())

    wait_for(saving, proc, every=0.005)
    proc.kill()
    proc.communicate()
    names = sorted(p.name for p in ckpt.iterdir())
    assert any(".orbax-checkpoint-tmp" in n for n in names), names  # killed mid-save
    complete = complete_steps(ckpt)
    assert complete, f"keep=1 lost the last complete checkpoint: {names}"  # never deleted before a newer one
    resumed = subprocess.run(cli(run, *args), env=env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ignoring incomplete checkpoint" in resumed.stdout
    assert f"resumed from the checkpoint at step {complete[-1]}" in resumed.stdout
    assert logged_steps(run) == list(range(1, 15))  # every step once, re-logged after the resume point
    assert complete_steps(ckpt) == [14] and not any(".orbax-checkpoint-tmp" in p.name for p in ckpt.iterdir())
