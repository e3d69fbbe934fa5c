"""Hostile and broken inputs to training runs: checkpoints damaged in place (checksums), damaged data
state, a second run on one run dir (the lock), a refused resume (config.yaml kept), a non-finite first
loss after a resume, SIGTERM before the first step, Ctrl-C twice, duplicated metrics lines, a huge
``--max-new-tokens``, ``eval`` overrides after its options."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxllama.checkpoint import load_params, save_params
from jaxllama.checkpoint.checksum import ChecksumError
from jaxllama.errors import ConfigError, RunError
from jaxllama.train.loop import train, trim_metrics
from jaxllama.train.run_lock import RunLock
from test_checkpoint import arrays_equal, cfg_for, losses

QUIET = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted 4-step run saving every 2 steps: what a fallback must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(cfg_for(run, "train.steps=4", "checkpoint.every=2"), out=QUIET)
    return run


def flip_bytes(step_dir, item="params", n=64):
    """Flip ``n`` bytes in the middle of the largest data file of ``item``: same size, new contents."""
    victim = max((p for p in (step_dir / item).rglob("*") if p.is_file() and "manifest" not in p.name),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    victim.write_bytes(bytes(data))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bytes_changed_in_place_are_caught_by_the_checksums(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    flip_bytes(run / "checkpoints" / "4")
    params, _ = load_params(str(run))  # the params reader falls back too
    assert "does not match the checksum" in capsys.readouterr().out
    assert arrays_equal(params, load_params(str(finished_run / "checkpoints" / "2"))[0])
    lines = []
    summary = train(cfg_for(run, "train.steps=4", "checkpoint.every=2"), out=lines.append)
    text = "\n".join(lines)
    assert "checkpoint step 4" in text and "does not match the checksum" in text and "falling back to step 2" in text
    assert summary["resumed_from"] == 2
    assert losses(run) == losses(finished_run)  # steps 3, 4 re-trained from step 2, identically
    assert any(p.name.startswith("4.damaged-") for p in (run / "checkpoints").iterdir())


def test_a_damaged_params_export_is_refused_by_every_reader(tmp_path, finished_run):
    params, model_cfg = load_params(str(finished_run))
    out = tmp_path / "export"
    save_params(str(out), params, model_cfg)
    flip_bytes(out)
    with pytest.raises(RunError, match="does not match the checksum"):
        load_params(str(out))
    from jaxllama.checkpoint.params import open_params

    arrays, _ = open_params(str(out))  # the lazy reader convert uses: checked per layer as it reads
    with pytest.raises(ChecksumError, match="does not match the checksum"):
        for a in arrays.values():
            for i in range(a.shape[0]) if a.layered else [None]:
                np.asarray(a) if i is None else a[i]
    r = subprocess.run([sys.executable, "-m", "jaxllama.cli", "convert", str(out), str(tmp_path / "hf"), "--to", "hf"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "does not match the checksum" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("state", [{"position": -100}, {"position": "abc"}, "abc"])
def test_damaged_data_state_falls_back(tmp_path, finished_run, state):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoints" / "4" / "data" / "process_0-of-1.json").write_text(json.dumps(state))
    lines = []
    summary = train(cfg_for(run, "train.steps=4", "checkpoint.every=2"), out=lines.append)
    assert summary["resumed_from"] == 2, lines
    assert any("data state" in x and "falling back to step 2" in x for x in lines), lines
    assert losses(run) == losses(finished_run)


def test_a_nonfinite_first_loss_after_resume_stops_the_run(tmp_path, finished_run):
    """Damage the checksums cannot see (a checkpoint from before them): NaN weights, the recorded loss finite."""
    import tensorstore as ts

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    step = run / "checkpoints" / "4"
    shutil.rmtree(step / "checksums")
    from jaxllama.checkpoint.params import open_params

    key = next(k for k in open_params(str(step))[0] if not k.startswith("layers/"))  # e.g. the embedding
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{step / 'params'}/",
                                          "path": key.replace("/", ".") + "/"}}
    arr = ts.open(spec, open=True).result()
    arr.write(np.full(arr.shape, np.nan, arr.dtype.numpy_dtype)).result()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(RunError, match="first loss after resuming is nan"):
        train(cfg_for(run, "train.steps=6", "checkpoint.every=1"), out=QUIET)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing saved over the good ones
    assert not (run / ".lock").exists() or RunLock(run).acquire().release() is None  # and the lock is free


def test_one_run_per_run_dir(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config_before = (run / "config.yaml").read_text()
    metrics_before = (run / "metrics.jsonl").read_text()
    with RunLock(run):  # another run holds it (an flock: a second open file, as a second process would)
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+ on .*one run per run dir"):
            train(cfg_for(run, "train.steps=6", "optim.lr=1e-3"), out=QUIET)
    assert (run / "config.yaml").read_text() == config_before
    assert (run / "metrics.jsonl").read_text() == metrics_before
    (run / ".lock").write_text('{"host": "gone", "pid": 999999, "since": "then"}')  # a dead holder: no flock
    assert train(cfg_for(run, "train.steps=5", "checkpoint.every=2"), out=QUIET)["resumed_from"] == 4


def test_a_refused_resume_keeps_config_yaml(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="does not fit the config"):
        train(cfg_for(run, "train.steps=6", "model.dim=48"), out=QUIET)
    assert (run / "config.yaml").read_text() == before


def test_empty_run_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="run_dir: empty"):
        train(cfg_for("", "train.steps=1"), out=QUIET)
    assert not list(tmp_path.iterdir())


def test_sigterm_before_the_first_step_says_nothing_was_saved(tmp_path, monkeypatch):
    import os

    from jaxllama.train.loop import Trainer

    compile_ = Trainer.compile

    def compile_then_sigterm(self, batch):  # the signal lands while the step compiles
        seconds = compile_(self, batch)
        os.kill(os.getpid(), signal.SIGTERM)
        return seconds

    monkeypatch.setattr(Trainer, "compile", compile_then_sigterm)
    lines = []
    summary = train(cfg_for(tmp_path / "run", "train.steps=3"), out=lines.append)
    assert summary["preempted"] and summary["steps"] == 0
    assert "before the first step" in lines[-1] and "nothing new to save" in lines[-1]
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


def test_ctrl_c_twice_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "jaxllama.cli", "train", "model.preset=debug", "data.source=synthetic",
           "data.seq_len=32", "data.global_batch=8", "train.steps=100000", "train.log_every=1",
           "checkpoint.every=1", "train.progress=false", "train.tensorboard=false", f"run_dir={tmp_path / 'run'}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "run" / "checkpoints" / "2").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err.splitlines()[-1], err[-2000:]


def test_metrics_lines_of_a_step_logged_twice_are_kept_once(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},
             {"step": 3, "loss": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')
    trim_metrics(tmp_path, 2)
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}]


def test_max_new_tokens_is_capped_by_the_context():
    """10^9 new tokens on a 64-position model: the buffers are sized by the context (before: 12 GB of them)."""
    from helpers import arch_for, random_params
    from jaxllama.infer.engine import Engine
    from jaxllama.infer.sampling import Sampling

    a = arch_for("model.max_position=64")
    out = Engine(random_params(a), a).generate([[1, 2, 3]], 10**9, Sampling(temperature=0))[0]
    assert len(out.tokens) == 61 and out.finish_reason == "length"


def test_eval_overrides_after_options(finished_run):
    r = subprocess.run([sys.executable, "-m", "jaxllama.cli", "eval", str(finished_run), "--data", "synthetic",
                        "--batch", "8", "data.seq_len=16", "--max-batches", "1", "data.packing=concat"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == 8 * 16


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints(tmp_path, finished_run, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    run = tmp_path / "run"
    sh.copytree(finished_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - (300 << 10), 300 << 10))
    with pytest.raises(RunError, match=r"checkpoint.dir .*: 0.3 MiB free, a checkpoint needs about"):
        train(cfg_for(run, "train.steps=6", "checkpoint.every=1"), out=QUIET)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_an_unwritable_checkpoint_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    r = subprocess.run([sys.executable, "-m", "jaxllama.cli", "train", "model.preset=debug", "data.source=synthetic",
                        "data.seq_len=32", "data.global_batch=8", "train.steps=1", f"run_dir={tmp_path / 'run'}",
                        f"checkpoint.dir={tmp_path / 'file' / 'ck'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"jaxllama: error: checkpoint.dir {tmp_path / 'file' / 'ck'}: cannot create it (Not a directory)"], r.stderr



@pytest.fixture
def ctrl_c_installed():
    """``interrupts.install()`` as the CLI runs it (from Python's default SIGINT handler), undone after."""
    from jaxllama import interrupts

    old, old_hook = signal.signal(signal.SIGINT, signal.default_int_handler), sys.unraisablehook
    interrupts.install()
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, old)
        sys.unraisablehook = old_hook


def test_first_ctrl_c_inside_deferred_is_raised_when_the_block_ends(ctrl_c_installed):
    """A Ctrl-C while Orbax is handed a save (or waited for) is held until that returns: raised inside
    Orbax's wait it was logged with a library traceback and left the save's finalize thread behind."""
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_installed.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here and must not raise
            finished = True
    assert finished and signal.getsignal(signal.SIGINT) is ctrl_c_installed._now  # a second one exits at once


def test_first_ctrl_c_landing_in_a_gc_callback_is_delivered_again(ctrl_c_installed):
    """Python prints and drops an exception raised in a gc callback (JAX registers one): a Ctrl-C that
    landed there was lost, and `generate` ran to the end and exited 0 (seen in the suite)."""
    import gc

    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(phase)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs inside the callback, whose exception Python drops

    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            gc.collect()
            for _ in range(100):
                time.sleep(0.01)
        assert fired and signal.getsignal(signal.SIGINT) is ctrl_c_installed._now
    finally:
        gc.callbacks.remove(callback)
