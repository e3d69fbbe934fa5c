"""The training loop end to end: loss falls, metrics and config are written, NaNs stop the run."""

import json

import numpy as np
import pytest
import yaml

from jaxllama.config import load_config
from jaxllama.data.synthetic import SyntheticSource
from jaxllama.errors import RunError
from jaxllama.train.loop import train

FIELDS = {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "step_time_s"}


def test_tiny_loss_falls_in_30_steps(tmp_path):
    cfg = load_config(None, ["data.source=synthetic",
                             "model.preset=tiny", "train.steps=30", "train.log_every=5", "data.seq_len=64",
                             "data.global_batch=16", "optim.warmup_steps=5", "mesh.data=2", "mesh.fsdp=4",
                             f"run_dir={tmp_path / 'run'}"])
    lines = []
    summary = train(cfg, out=lines.append)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert FIELDS <= set(rows[0])
    assert rows[0]["loss"] > np.log(2048) - 1.5  # starts near uniform over the vocabulary
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert summary["final_loss"] == rows[-1]["loss"] and lines[-1].startswith("done: 30 steps")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["dim"] == 256 and saved["run_dir"] == str(tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


class PoisonedSource(SyntheticSource):
    """Every batch has a NaN in its loss mask, so every loss is NaN."""

    def __next__(self):
        batch = super().__next__()
        batch["loss_mask"] = batch["loss_mask"].copy()
        batch["loss_mask"][0, 0] = np.nan
        return batch


def test_nonfinite_losses_stop_the_run(tmp_path):
    cfg = load_config(None, ["data.source=synthetic",
                             "model.preset=debug", "train.steps=20", "train.log_every=1", "data.seq_len=32",
                             "data.global_batch=8", "train.max_nonfinite=3", f"run_dir={tmp_path}"])
    with pytest.raises(RunError, match="3 steps in a row"):
        train(cfg, source=PoisonedSource(cfg.model.vocab_size, 32, 8), out=lambda _: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["skipped_nonfinite"] == 3


def test_same_seed_same_losses(tmp_path):
    """Determinism on CPU: the same seed and layout give bitwise-identical losses; another seed differs."""
    def losses(name, seed):
        cfg = load_config(None, ["data.source=synthetic",
                             "model.preset=debug", "train.steps=4", "train.log_every=1", "data.seq_len=32",
                                 "data.global_batch=8", f"train.seed={seed}", "mesh.data=2", "mesh.fsdp=2",
                                 "mesh.tensor=2", f"run_dir={tmp_path / name}"])
        return [r["loss"] for r in train(cfg, out=lambda _: None)["history"]]

    first = losses("a", 1)
    assert losses("b", 1) == first
    assert losses("c", 2) != first


def test_cpu_peak_is_measured_once_and_kept(tmp_path, monkeypatch):
    """MFU on CPU compares between runs: the host's peak is measured once (best of five) and cached."""
    from jaxllama.train import metrics

    calls = []
    monkeypatch.setattr(metrics, "measure_cpu_flops", lambda seconds: calls.append(seconds) or 1e10 * len(calls))
    first, source = metrics.cpu_peak_flops(tmp_path)
    assert first == 5e10 and len(calls) == 5 and "cached in" in source and metrics.cpu_name() in source
    again, _ = metrics.cpu_peak_flops(tmp_path)
    assert again == first and len(calls) == 5  # read back, not re-measured
    (tmp_path / "cpu-peak.json").write_text("{not json")  # a damaged cache is measured again, then rewritten
    assert metrics.cpu_peak_flops(tmp_path)[0] == 1e11 and len(calls) == 10
    assert json.loads((tmp_path / "cpu-peak.json").read_text())[metrics.cpu_name()]["flops"] == 1e11
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert metrics.cpu_peak_flops(blocked)[0] > 0  # an unwritable cache only costs a measurement


def test_a_run_whose_data_fails_leaves_no_run_dir(tmp_path):
    """No documents in data.source: one error, and no runs/<ts>/ holding only config.yaml."""
    from jaxllama.errors import JaxllamaError

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    run = tmp_path / "run"
    cfg = load_config(None, ["model.preset=debug", "model.vocab_size=512", f"data.source={tmp_path / 'empty'}/*.txt",
                             "data.seq_len=32",
                             "data.global_batch=8", "train.steps=2", "data.skip_bad_records=true",
                             f"data.tokenizer={tmp_path / 'tok.model'}", f"run_dir={run}"])
    from jaxllama.data.tokenizers import train_sentencepiece

    rng = np.random.default_rng(0)
    words = "a tokenizer needs some varied text to learn its pieces from every line".split()
    train_sentencepiece([" ".join(rng.choice(words, 12)) for _ in range(300)], vocab_size=320,
                        output=str(tmp_path / "tok.model"))
    with pytest.raises(JaxllamaError, match="got no documents"):
        train(cfg, out=lambda _: None)
    assert not run.exists()
