"""The training loop: a program (:func:`jaxllama.program.build_program`) and its state, stepped over a
data source (:class:`jaxllama.data.sources.BatchSource`), with components that each own their cadence.

Each step: dispatch it, then the checkpointer (:class:`jaxllama.checkpoint.manager.TrainCheckpoints`),
the evaluator (:class:`jaxllama.train.evaluate.Evaluator`) and the metrics log
(:class:`jaxllama.train.metrics.MetricsLog`) act if they are due, in that order; SIGTERM
(:class:`jaxllama.checkpoint.preemption.PreemptionWatch`) ends the loop after a final checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxllama.checkpoint.manager import TrainCheckpoints
from jaxllama.checkpoint.params import as_path, complete_steps
from jaxllama.checkpoint.preemption import PreemptionWatch
from jaxllama.config import Config, save_config
from jaxllama.errors import ConfigError, RunError
from jaxllama.plan import check_host_memory
from jaxllama.program import Program, build_program
from jaxllama.program.step import TrainState
from jaxllama.train.metrics import MetricsLog, beside_bars
from jaxllama.train.run_lock import RunLock


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
        trainer = cls(program, program.init_state() if init else program.abstract_inputs()[0])
        if init:
            trainer._attach_reference(print)
        return trainer

    cfg = property(lambda self: self.program.cfg)
    arch = property(lambda self: self.program.arch)
    layout = property(lambda self: self.program.layout)
    tx = property(lambda self: self.program.tx)
    state_shardings = property(lambda self: self.program.state_shardings)

    @property
    def lora(self) -> bool:
        return self.program.state_shardings.frozen is not None

    def base_weights(self, say: Callable[[str], None] = print) -> Any:
        """A LoRA run's frozen base in its shards: ``train.init_from``'s weights, else from the seed."""
        if not self.cfg.train.init_from:
            return None  # init_state creates it from the seed
        from jaxllama.model import quant
        from jaxllama.program.step import quantize_base
        from jaxllama.train.init_from import initial_params

        frozen = self.state_shardings.frozen  # QLoRA: read float weights, then quantize them in their shards
        return quantize_base(self.arch, initial_params(self.cfg, quant.float_shardings(frozen), say), frozen)

    def initialize(self, say: Callable[[str], None] = print) -> None:
        """Fresh parameters (from ``train.seed``, or ``train.init_from``'s weights) and optimizer state, in
        their shards. LoRA: fresh adapters (a zero delta) over the base weights."""
        if self.lora:
            self.state = self.program.init_state(frozen=self.base_weights(say))
        elif not self.cfg.train.init_from:
            self.state = self.program.init_state()
        else:
            from jaxllama.train.init_from import initial_params

            sh = self.state_shardings
            params = initial_params(self.cfg, sh.params, say)
            opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
            step = jax.device_put(np.zeros((), np.int32), sh.step)
            self.state = TrainState(step=step, params=params, opt_state=opt_state)
        self._attach_reference(say)

    def attach_base(self, say: Callable[[str], None] = print) -> None:
        """After a resume (checkpoints hold the trained leaves and their optimizer state only): a LoRA
        run's base, and a DPO run's separate reference."""
        if self.lora:
            frozen = self.base_weights(say)
            if frozen is None:
                frozen = self.program.init_base()
            self.state = self.state.replace(frozen=frozen)
        self._attach_reference(say)

    def _attach_reference(self, say: Callable[[str], None]) -> None:
        """DPO with ``train.dpo.reference=separate``: the reference weights (``train.dpo.reference_path``,
        default ``train.init_from``), frozen, sharded like the policy."""
        sh = self.state_shardings.reference
        if sh is None:
            return
        from jaxllama.config import reference_weights
        from jaxllama.train.init_from import initial_params

        path, key = reference_weights(self.cfg)
        self.state = self.state.replace(reference=initial_params(self.cfg, sh, say, path=path, key=key))

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


def make_run_dir(cfg: Config) -> tuple[Path, bool]:
    """(the run dir, whether this call created it). Its ``config.yaml`` is written only once the run
    is accepted (:func:`write_run_config`): a refused resume leaves the earlier one as it was."""
    if cfg.run_dir is None:
        cfg.run_dir = new_run_dir()
    run_dir = Path(cfg.run_dir)
    fresh = not run_dir.exists()
    if jax.process_index() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"run_dir {run_dir}: cannot create it ({e.strerror})") from None
    return run_dir, fresh


def write_run_config(cfg: Config, run_dir: Path) -> list[str]:
    """Write RUN_DIR/config.yaml (process 0); returns the settings that differ from the one it replaces."""
    if jax.process_index() != 0:
        return []
    try:
        return save_config(cfg, run_dir / "config.yaml")
    except OSError as e:
        raise RunError(f"{run_dir / 'config.yaml'}: cannot write it ({e.strerror})") from None


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


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (they are re-logged by the resumed run); temp file + rename.

    A line cut short by a kill mid-write is dropped too, and so is all but the last line of a step.
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    kept, seen = [], set()
    for line in reversed(path.read_text().splitlines()):  # a step logged twice (an older run's line): keep the last
        at = logged_step(line)
        if at <= step and at not in seen:
            seen.add(at)
            kept.append(line)
    kept.reverse()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def train(cfg: Config, source: Any = None, devices: list | None = None,
          out: Callable[[str], None] = print, resume: bool = True) -> dict:
    """Train per ``cfg``, resuming from the run dir's latest complete checkpoint unless ``resume`` is False.

    ``source``: a :class:`jaxllama.data.sources.BatchSource` (default: ``data.source``). Returns the
    summary (also printed as one line); ``summary["preempted"]`` is True when SIGTERM stopped the run
    after a final checkpoint. The run holds RUN_DIR's lock (:class:`RunLock`) throughout.
    """
    is_main = jax.process_index() == 0
    say = beside_bars(out) if is_main else (lambda _: None)
    if not resume:
        refuse_existing(cfg)
    trainer = Trainer.build(cfg, devices, init=False)  # state filled below: restored, or initialized
    check_host_memory(trainer.program)  # before anything is allocated
    if source is None:  # before the run dir exists: bad data leaves no folder behind
        from jaxllama.data.sources import make_source

        source = make_source(cfg)
    run_dir, fresh = make_run_dir(cfg)
    lock = RunLock(run_dir)

    def discard_if_empty() -> None:  # refused before anything was written: leave no folder behind
        if fresh and is_main and run_dir.is_dir() and not any(p.name != lock.path.name for p in run_dir.iterdir()):
            shutil.rmtree(run_dir, ignore_errors=True)

    try:
        if is_main:
            lock.acquire()
        # SIGTERM from here on ends the run cleanly: at a step boundary after a final checkpoint, or,
        # before the first step, at once with nothing to save (said so).
        with PreemptionWatch() as watch:
            return _train(cfg, trainer, source, run_dir, fresh, watch, say, is_main)
    except OSError as e:  # the run dir's own files (metrics, config, tokenizer copy): a full or read-only disk
        discard_if_empty()
        raise RunError(f"{e.filename or run_dir}: cannot write ({e.strerror or e}); checkpoints already complete "
                       "are kept and a rerun resumes from the newest") from None
    except BaseException:
        discard_if_empty()
        raise
    finally:
        lock.release()


def _restore_or_initialize(cfg: Config, trainer: Trainer, source: Any, ckpts: Any, say: Callable) -> int:
    """The step the run continues from: a checkpoint's (its data state accepted by ``source``), else 0."""
    restored = ckpts.restore_latest(trainer.state, trainer.state_shardings, cfg.model, accept=source.restore) \
        if ckpts else None
    if restored is None:
        trainer.initialize(say)
        if cfg.train.init_from:
            say(f"initialized the parameters from {cfg.train.init_from}")
        return 0
    start, trainer.state, _ = restored
    trainer.attach_base(say)
    say(f"resumed from the checkpoint at step {start} in {ckpts.directory}")
    return start


def _train(cfg: Config, trainer: Trainer, source: Any, run_dir: Path, fresh: bool, watch: PreemptionWatch,
           say: Callable[[str], None], is_main: bool) -> dict:
    from jaxllama.train.evaluate import Evaluator, wants_eval

    evaluator = Evaluator(trainer.program) if wants_eval(cfg) else None
    t, c = cfg.train, cfg.checkpoint
    ckpts = TrainCheckpoints(checkpoint_dir(cfg, run_dir), c, say) if c.enabled else None
    try:
        start = _restore_or_initialize(cfg, trainer, source, ckpts, say)
        changed = write_run_config(cfg, run_dir)  # the run is accepted: its config replaces the earlier one
    except BaseException:
        if ckpts:
            ckpts.close()
        raise
    if start and changed:
        say(f"resumed with settings changed since the run's config.yaml (now rewritten): {'; '.join(changed)}")
    if source.tok is not None and is_main and not (run_dir / "tokenizer").exists():
        from jaxllama.data.tokenizers import copy_tokenizer

        copy_tokenizer(source.tok, run_dir / "tokenizer")
    if is_main:
        trim_metrics(run_dir, start)
    if start >= t.steps:
        if ckpts:
            ckpts.close()
        say(f"done: already trained to step {start} (train.steps={t.steps}); run dir {run_dir}")
        return dict(steps=start, history=[], run_dir=str(run_dir), preempted=False, resumed_from=start,
                    line=f"already at step {start}")
    if trainer.program.batch.extra:  # train.dpo.reference=cached: batches carry the reference's values
        from jaxllama.train.reference_cache import cached_source

        source = cached_source(trainer, source, run_dir, say)
    log = MetricsLog(trainer.program, run_dir, source, start, is_main, say)
    a = trainer.arch
    say(f"jaxllama: {cfg.model.preset} ({a.dtype} compute, attention {a.attention}) on {trainer.program.plan.size} "
        f"{jax.devices()[0].platform} device(s), mesh {trainer.program.plan.describe()}; run dir {run_dir}")
    say(source.describe())
    say(f"peak FLOP/s per device: {log.peak:.3g}, {log.peak_source}")

    try:
        batch = trainer.global_batch(next(source))
    except BaseException:  # the data failed before any step (no documents, a bad record): leave no empty run
        log.close()
        if ckpts:
            ckpts.close()
        if fresh and is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    say("compiling the train step...")
    say(f"compiled the train step in {trainer.compile(batch):.1f}s")
    preempted = early = False
    recorded = getattr(ckpts, "recorded_loss", None) if start else None
    try:
        for step in range(start, t.steps):
            if step == start and watch.reached(step):  # SIGTERM before the first step: nothing new to save
                preempted = early = True
                break
            if step > start:
                batch = trainer.global_batch(next(source))
            metrics = trainer.step(batch)
            log.add(metrics)
            if step == start and recorded is not None:
                check_resumed_loss(float(metrics["loss"]), recorded, start, ckpts.directory)
            done = step + 1
            preempted = watch.reached(done)
            final = preempted or done == t.steps
            if ckpts and ckpts.due(done, final):
                loss = float(metrics["loss"])
                log.note({"checkpoint_block_s": ckpts.save(done, trainer.state, cfg, source.state(), loss)})
            if evaluator and evaluator.due(done):
                result = evaluator(trainer.state.model_tree())
                log.note(result, paused_s=result["eval_time_s"])  # throughput counts training time only
            if log.due(done, final):
                log.flush(done)
            if preempted:
                break
    finally:
        log.close()
        if ckpts:
            ckpts.close()  # waits for a save in flight: a finished run always ends with a complete checkpoint
    if early:
        line = (f"preempted (SIGTERM) before the first step: nothing trained since step {start}, nothing new to "
                f"save; run the same command to {'resume' if start else 'start again'}; run dir {run_dir}")
        say(line)
        return dict(steps=start, history=[], run_dir=str(run_dir), preempted=True, resumed_from=start, line=line,
                    checkpoint_block_s=[])
    summary = summarize(log.history, t.steps, run_dir)
    summary.update(preempted=preempted, resumed_from=start, checkpoint_block_s=ckpts.block_times if ckpts else [])
    if preempted:
        saved = ("checkpoint saved and complete; run the same command to resume" if ckpts
                 else "nothing saved (checkpoint.enabled=false)")
        summary["line"] = f"preempted (SIGTERM) at step {log.history[-1]['step']}: {saved}; run dir {run_dir}"
    say(summary["line"])
    return summary


def check_resumed_loss(loss: float, recorded: float, step: int, directory: Any) -> None:
    """The first loss after a resume is non-finite although the checkpoint's last loss was finite: the
    restored values are wrong (damage the checksums could not see, e.g. a checkpoint written before
    they existed). Stop before anything is saved over the good checkpoints."""
    if not math.isfinite(loss) and recorded is not None and math.isfinite(recorded):
        raise RunError(f"resumed from step {step} in {directory}, whose recorded loss was {recorded:.4f}, but the "
                       f"first loss after resuming is {loss}: the checkpoint is likely damaged; nothing was saved "
                       f"(move {directory}/{step} aside to resume from the previous step)")


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
