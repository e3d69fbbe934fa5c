"""The training loop's components; each owns its cadence (``due``) and its side effects.

- :class:`Checkpointing`: restore at start, save every ``checkpoint.every`` steps, at the end and on
  preemption, and report how long each save blocked training.
- :class:`MetricsLog`: keeps step metrics on device until a log step (no per-step host sync, so
  dispatch runs ahead of the accelerator), then one record to the terminal, ``metrics.jsonl`` and
  TensorBoard; stops the run after ``train.max_nonfinite`` non-finite steps in a row.

Evaluation is :class:`jaxllama.train.evaluate.Evaluator`; preemption is
:class:`jaxllama.checkpoint.preemption.PreemptionWatch`. Only process 0 writes files and prints.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxllama.checkpoint.manager import TrainCheckpoints
from jaxllama.checkpoint.params import as_path, complete_steps
from jaxllama.config import Config
from jaxllama.errors import ConfigError, RunError
from jaxllama.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device


def checkpoint_dir(cfg: Config, run_dir: Path) -> str:
    """``checkpoint.dir``, else RUN_DIR/checkpoints; joined as text so a ``gs://`` run dir keeps its scheme."""
    return cfg.checkpoint.dir or f"{str(cfg.run_dir or run_dir).rstrip('/')}/checkpoints"


def refuse_existing(cfg: Config) -> None:
    """``--no-resume``: a run dir that already holds checkpoints is an error, not something to overwrite."""
    if cfg.run_dir is None or not cfg.checkpoint.enabled:
        return
    steps = complete_steps(as_path(checkpoint_dir(cfg, Path(cfg.run_dir))))
    if steps:
        raise ConfigError(f"run_dir {cfg.run_dir} already has checkpoints (latest step {steps[-1]}) and --no-resume "
                          f"was given; choose a new run_dir or drop --no-resume to continue it")


class Checkpointing:
    """Orbax training checkpoints of a run (a no-op when ``checkpoint.enabled`` is false)."""

    def __init__(self, cfg: Config, run_dir: Path, say: Callable[[str], None]):
        self.cfg, self.say = cfg, say
        c = cfg.checkpoint
        self.ckpts = TrainCheckpoints(checkpoint_dir(cfg, run_dir), c, say) if c.enabled else None

    def restore(self, trainer: Any, source: Any) -> int | None:
        """Fill ``trainer.state`` and the source's position from the latest complete checkpoint; the
        step restored, or None when there is none."""
        restored = self.ckpts.restore_latest(trainer.state, trainer.state_shardings, self.cfg.model) \
            if self.ckpts else None
        if restored is None:
            return None
        step, trainer.state, data_state = restored
        source.restore(data_state)
        self.say(f"resumed from the checkpoint at step {step} in {self.ckpts.directory}")
        return step

    def due(self, step: int, final: bool) -> bool:
        every = self.cfg.checkpoint.every
        return self.ckpts is not None and (final or bool(every and step % every == 0))

    def save(self, step: int, state: Any, source: Any) -> dict:
        """Save; returns ``{"checkpoint_block_s": seconds}`` for the next metrics record."""
        # Steps are dispatched ahead: wait for them to finish computing first, so the figure is the
        # save's own cost, not the queued steps' compute time.
        jax.block_until_ready(state)
        blocked = self.ckpts.save(step, state, self.cfg, source.state())
        self.say(f"checkpoint at step {step}: the save blocked training for {1000 * blocked:.0f} ms"
                 f"{' (written in the background)' if self.cfg.checkpoint.async_save else ''}")
        return {"checkpoint_block_s": blocked}

    @property
    def block_times(self) -> list[float]:
        return self.ckpts.block_times if self.ckpts else []

    def close(self) -> None:
        if self.ckpts:
            self.ckpts.close()  # waits for a save in flight: a finished run always ends with a complete checkpoint


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line per log step."""

    def __init__(self, total: int, enabled: bool, out: Callable[[str], None]):
        self.out = out
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, record: dict, n: int) -> None:
        text = (f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%")
        if "eval_loss" in record:
            text += f" | eval loss {record['eval_loss']:.4f} (ppl {record['eval_ppl']:.1f})"
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(text)
        else:
            self.out(f"step {record['step']:>6} | {text} | lr {record['lr']:.2e} | grad_norm {record['grad_norm']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """Pending step metrics -> one record every ``train.log_every`` steps (and at the end)."""

    def __init__(self, program: Any, run_dir: Path, source: Any, start: int, is_main: bool,
                 say: Callable[[str], None]):
        cfg = program.cfg
        self.t, self.source, self.say = cfg.train, source, say
        self.n_devices = program.plan.size
        self.peak, self.peak_source = peak_flops_per_device(self.t.peak_flops)
        self.flops = flops_per_token(program.arch, cfg.data.seq_len)
        self.flops_nc = flops_per_token(program.arch, cfg.data.seq_len, causal=False)
        self.tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
        self.writer = MetricsWriter(run_dir, enabled=is_main, tensorboard=self.t.tensorboard)
        self.progress = Progress(self.t.steps - start, self.t.progress and is_main, say)
        self.pending: list = []
        self.extra: dict = {}  # one-off figures (eval results, checkpoint blocking time) for the next record
        self.history: list[dict] = []
        self.bad_in_row = self.skipped = self.skipped_records = 0
        self.last_time = time.perf_counter()

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def note(self, figures: dict, paused_s: float = 0.0) -> None:
        """Figures for the next record; ``paused_s`` of non-training time (eval) is left out of throughput."""
        self.extra.update(figures)
        self.last_time += paused_s

    def due(self, step: int, final: bool) -> bool:
        return final or step % self.t.log_every == 0

    def flush(self, step: int) -> dict:
        fetched = jax.device_get(self.pending)
        self.pending = []
        now = time.perf_counter()
        elapsed, self.last_time = now - self.last_time, now
        for m in fetched:
            self.bad_in_row = 0 if m["finite"] else self.bad_in_row + 1
            self.skipped += 1 - int(m["finite"])
        finite = [m for m in fetched if m["finite"]]
        tps = self.tokens_per_step * len(fetched) / elapsed
        per_device = tps / self.n_devices / self.peak if self.peak else 0.0
        record = dict(
            step=step,
            loss=float(np.mean([m["loss"] for m in finite])) if finite else math.nan,
            grad_norm=float(np.mean([m["grad_norm"] for m in finite])) if finite else math.nan,
            lr=float(fetched[-1]["lr"]), tokens_per_s=tps, mfu=per_device * self.flops,
            mfu_noncausal=per_device * self.flops_nc, step_time_s=elapsed / len(fetched),
            skipped_nonfinite=self.skipped)
        if self.source.efficiency is not None:
            record["packing_efficiency"] = self.source.efficiency
        bad = self.source.bad
        if bad is not None and bad.count:  # data.skip_bad_records
            if bad.count > self.skipped_records:
                self.say(f"skipped {bad.count} bad records so far (last: {bad.last})")
            self.skipped_records = record["data_skipped"] = bad.count
        record.update(self.extra)
        self.extra = {}
        self.writer.write(record)
        self.progress.update(record, len(fetched))
        self.history.append(record)
        if self.bad_in_row >= self.t.max_nonfinite:
            raise RunError(f"loss was not finite for {self.bad_in_row} steps in a row (up to step {step}); "
                           f"stopping (train.max_nonfinite={self.t.max_nonfinite}); try a lower optim.lr")
        return record

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (they are re-logged by the resumed run); temp file + rename.

    A line cut short by a kill mid-write is dropped too.
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    kept = [line for line in path.read_text().splitlines() if logged_step(line) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
