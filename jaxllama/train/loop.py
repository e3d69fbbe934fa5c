"""The training loop: a program (:func:`jaxllama.program.build_program`) and its state, stepped over a
data source, with components that each own their cadence (:mod:`jaxllama.train.components`).

Each step: dispatch it, then let the checkpointer, the evaluator and the metrics log act if they are
due, in that order; SIGTERM ends the loop after a final checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxllama.checkpoint.preemption import PreemptionWatch
from jaxllama.config import Config, save_config
from jaxllama.errors import ConfigError
from jaxllama.plan import check_host_memory
from jaxllama.program import Program, build_program
from jaxllama.program.step import TrainState
from jaxllama.train.components import Checkpointing, MetricsLog, refuse_existing, trim_metrics


@dataclass
class Trainer:
    """A built :class:`Program` and the live train state (also used by benchmarks and tests)."""

    program: Program
    state: Any

    @classmethod
    def build(cls, cfg: Config, devices: list | None = None, init: bool = True) -> "Trainer":
        """With ``init=False`` the state is abstract (shapes + shardings): a restore fills it without
        first allocating a random copy, so resuming never needs twice the state's memory."""
        program = build_program(cfg, devices)
        return cls(program, program.init_state() if init else program.abstract_inputs()[0])

    cfg = property(lambda self: self.program.cfg)
    arch = property(lambda self: self.program.arch)
    layout = property(lambda self: self.program.layout)
    model = property(lambda self: self.program.model)
    tx = property(lambda self: self.program.tx)
    state_shardings = property(lambda self: self.program.state_shardings)

    def initialize(self, say: Callable[[str], None] = print) -> None:
        """Fresh parameters (from ``train.seed``, or ``train.init_from``'s weights) and optimizer state, in
        their shards."""
        if not self.cfg.train.init_from:
            self.state = self.program.init_state()
            return
        from jaxllama.train.init_from import initial_params

        sh = self.state_shardings
        params = initial_params(self.cfg, sh.params, say)
        opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
        step = jax.device_put(np.zeros((), np.int32), sh.step)
        self.state = TrainState(step=step, params=params, opt_state=opt_state)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return self.program.batch.to_global(local)

    def compile(self, batch: dict[str, jax.Array]) -> float:
        """Compile ahead of the first step; returns seconds spent."""
        start = time.perf_counter()
        self._compiled = self.program.train_step.lower(self.state, batch).compile()
        return time.perf_counter() - start

    def step(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        step_fn = getattr(self, "_compiled", None) or self.program.train_step
        self.state, metrics = step_fn(self.state, batch)
        return metrics


def new_run_dir(root: str = "runs") -> str:
    base = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return str(path)


def prepare_run_dir(cfg: Config) -> Path:
    if cfg.run_dir is None:
        cfg.run_dir = new_run_dir()
    run_dir = Path(cfg.run_dir)
    if jax.process_index() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"run_dir {run_dir}: cannot create it ({e.strerror})") from None
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def train(cfg: Config, source: Any = None, devices: list | None = None,
          out: Callable[[str], None] = print, resume: bool = True) -> dict:
    """Train per ``cfg``, resuming from the run dir's latest complete checkpoint unless ``resume`` is False.

    ``source``: a :class:`jaxllama.data.sources.BatchSource` (default: ``data.source``). Returns the
    summary (also printed as one line); ``summary["preempted"]`` is True when SIGTERM stopped the run
    after a final checkpoint.
    """
    is_main = jax.process_index() == 0
    say = out if is_main else (lambda _: None)
    if not resume:
        refuse_existing(cfg)
    trainer = Trainer.build(cfg, devices, init=False)  # state filled below: restored, or initialized
    check_host_memory(cfg, trainer.program.plan.size)  # before anything is allocated
    run_dir = prepare_run_dir(cfg)
    if source is None:
        from jaxllama.data.sources import make_source

        source = make_source(cfg)
    if source.tok is not None and is_main and not (run_dir / "tokenizer").exists():
        from jaxllama.data.tokenizers import copy_tokenizer

        copy_tokenizer(source.tok, run_dir / "tokenizer")
    from jaxllama.train.evaluate import Evaluator, wants_eval

    evaluator = Evaluator(trainer.program) if wants_eval(cfg) else None
    t = cfg.train
    ckpt = Checkpointing(cfg, run_dir, say)
    start = ckpt.restore(trainer, source)
    if start is None:
        start = 0
        trainer.initialize(say)
        if t.init_from:
            say(f"initialized the parameters from {t.init_from}")
    if is_main:
        trim_metrics(run_dir, start)
    if start >= t.steps:
        ckpt.close()
        say(f"done: already trained to step {start} (train.steps={t.steps}); run dir {run_dir}")
        return dict(steps=start, history=[], run_dir=str(run_dir), preempted=False, resumed_from=start,
                    line=f"already at step {start}")
    log = MetricsLog(trainer.program, run_dir, source, start, is_main, say)
    a = trainer.arch
    say(f"jaxllama: {cfg.model.preset} ({a.dtype} compute, attention {a.attention}) on {trainer.program.plan.size} "
        f"{jax.devices()[0].platform} device(s), mesh {trainer.program.plan.describe()}; run dir {run_dir}")
    say(source.describe())
    say(f"peak FLOP/s per device: {log.peak:.3g}, {log.peak_source}")

    batch = trainer.global_batch(next(source))
    say(f"compiled the train step in {trainer.compile(batch):.1f}s")
    preempted = False
    try:
        with PreemptionWatch() as watch:
            for step in range(start, t.steps):
                if step > start:
                    batch = trainer.global_batch(next(source))
                log.add(trainer.step(batch))
                done = step + 1
                preempted = watch.reached(done)
                final = preempted or done == t.steps
                if ckpt.due(done, final):
                    log.note(ckpt.save(done, trainer.state, source))
                if evaluator and evaluator.due(done):
                    began = time.perf_counter()
                    result = evaluator(trainer.state.params)
                    result["eval_time_s"] = time.perf_counter() - began
                    log.note(result, paused_s=result["eval_time_s"])  # throughput counts training time only
                if log.due(done, final):
                    log.flush(done)
                if preempted:
                    break
    finally:
        log.close()
        ckpt.close()
    summary = summarize(log.history, t.steps, run_dir)
    summary.update(preempted=preempted, resumed_from=start, checkpoint_block_s=ckpt.block_times)
    if preempted:
        saved = ("checkpoint saved and complete; run the same command to resume" if cfg.checkpoint.enabled
                 else "nothing saved (checkpoint.enabled=false)")
        summary["line"] = f"preempted (SIGTERM) at step {log.history[-1]['step']}: {saved}; run dir {run_dir}"
    say(summary["line"])
    return summary


def summarize(history: list[dict], steps: int, run_dir: Path) -> dict:
    """Mean throughput skips the first interval when there are others (it carries warm-up)."""
    timed = history[1:] or history
    tps = float(np.mean([r["tokens_per_s"] for r in timed]))
    mfu = float(np.mean([r["mfu"] for r in timed]))
    first, last = history[0]["loss"], history[-1]["loss"]
    line = (f"done: {steps} steps, loss {first:.4f} -> {last:.4f}, {tps:,.0f} tokens/s, "
            f"MFU {100 * mfu:.2f}%, skipped {history[-1]['skipped_nonfinite']} non-finite; run dir {run_dir}")
    return dict(steps=steps, first_loss=first, final_loss=last, tokens_per_s=tps, mfu=mfu, run_dir=str(run_dir),
                history=history, line=line)
