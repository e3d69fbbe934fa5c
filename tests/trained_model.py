"""A small model trained for real, shared by every test that needs weights with structure (not random).

``trained_tiny`` (session-scoped fixture) trains the ``tiny`` preset with ``model.ffn_dim=768`` (dim 256,
4 layers, 8/4 heads, vocab 2048, 4.2M parameters: every projection's input size is a multiple of 256,
as K-quants need) on the built-in ``stdlib`` corpus: seq_len 64, global batch 8, 100 steps at lr 3e-3
(cosine, 10 warmup steps), on one device, one checkpoint at the end. It returns the run directory, which
``jaxllama generate``, ``jaxllama eval`` and ``jaxllama convert RUN --to gguf`` accept; its
``tokenizer/`` (the cached stdlib SentencePiece demo tokenizer) travels into a GGUF export's vocab.

Cost on the 2-core CPU machine (2026-12): about 40 s (~15 s of start-up and compiling, ~20 s for the
100 steps, 1 s for the checkpoint), plus ~15 s for the stdlib demo tokenizer if this test session has
not trained it yet; the loss falls from ~7.6 (ln 2048) to about 5.1. Trained once per test session
(once per run under pytest-xdist, whose workers share it).

``train_tiny(dir)`` is the same as a plain function (benchmarks reuse it): trains into ``dir/run`` and
returns that path, or returns it at once when a finished run is already there.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

STEPS = 100
OVERRIDES = ("model.preset=tiny", "model.ffn_dim=768", "data.source=stdlib", "data.seq_len=64",
             "data.global_batch=8", f"train.steps={STEPS}", "train.log_every=20", "optim.lr=3e-3",
             "optim.warmup_steps=10", "checkpoint.every=0", "checkpoint.async_save=false")


def train_tiny(root: str | Path, out=lambda _: None) -> Path:
    """Train the fixture model into ``root/run`` (on one device) and return that run directory."""
    import jax

    from jaxllama.config import load_config
    from jaxllama.train.loop import train

    run = Path(root) / "run"
    if (run / "checkpoints" / str(STEPS)).is_dir():
        return run
    cfg = load_config(None, [*OVERRIDES, f"run_dir={run}"])
    summary = train(cfg, devices=jax.devices()[:1], out=out)
    assert summary["steps"] == STEPS, summary
    return run


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Path:
    """The run dir of the tiny model trained on the stdlib corpus (see the module docstring). Under
    pytest-xdist the workers of one run share it: the first trains it, the others wait on the lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base folder, above each worker's own
    with open(root / "trained_tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return train_tiny(root / "trained_tiny")
