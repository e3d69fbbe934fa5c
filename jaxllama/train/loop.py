"""The training loop: build mesh, model, state and step from a Config, then run and log.

Metrics stay on device between log steps (no per-step host sync), so dispatch runs ahead of the
accelerator; a log step fetches the pending metrics, and the time between log steps gives
throughput. Only process 0 writes files and prints.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from jaxllama.checkpoint.manager import TrainCheckpoints
from jaxllama.checkpoint.params import as_path, complete_steps
from jaxllama.checkpoint.preemption import PreemptionWatch
from jaxllama.config import Config, save_config
from jaxllama.errors import ConfigError, RunError
from jaxllama.model.llama import Arch, Llama
from jaxllama.parallel.mesh import make_mesh
from jaxllama.parallel.sharding import Layout, rules_from_config
from jaxllama.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from jaxllama.train.optimizer import make_optimizer
from jaxllama.plan import check_host_memory
from jaxllama.train.step import BATCH_KEYS, TrainState, init_state, make_loss_fn, make_train_step, state_shardings


@dataclass
class Trainer:
    """Everything a run needs, built once from the config (also used by benchmarks and tests)."""

    cfg: Config
    arch: Arch
    layout: Layout
    model: Llama
    state: Any
    state_shardings: Any
    step_fn: Callable  # jitted, donates the state
    schedule: Callable
    tx: Any = None

    @classmethod
    def build(cls, cfg: Config, devices: list | None = None, init: bool = True) -> "Trainer":
        """With ``init=False`` the state is abstract (shapes + shardings): a restore fills it without
        first allocating a random copy, so resuming never needs twice the state's memory."""
        mesh = make_mesh(cfg, devices)
        layout = Layout(mesh, rules_from_config(cfg.mesh.rules))
        arch = Arch.from_config(cfg.model)
        model = Llama(arch, layout)
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
        if init:
            state, shardings = init_state(model, tx, layout, cfg.train.seed)
        else:
            abstract, shardings = state_shardings(model, tx, layout)
            state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
        loss_fn = make_loss_fn(model, arch, cfg.data.seq_len, cfg.train.z_loss, cfg.train.loss_chunk)
        step = make_train_step(loss_fn, tx, schedule, cfg.train.grad_accum, layout)
        batch_sh = {k: layout.batch_sharding() for k in BATCH_KEYS}
        step_fn = jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, layout.replicated()),
                          donate_argnums=(0,))
        return cls(cfg, arch, layout, model, state, shardings, step_fn, schedule, tx)

    def initialize(self, say: Callable[[str], None] = print) -> None:
        """Fresh parameters (from ``train.seed``, or ``train.init_from``'s weights) and optimizer state, in
        their shards."""
        if not self.cfg.train.init_from:
            self.state, _ = init_state(self.model, self.tx, self.layout, self.cfg.train.seed)
            return
        from jaxllama.train.init_from import initial_params

        sh = self.state_shardings
        params = initial_params(self.cfg, sh.params, say)
        opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
        step = jax.device_put(np.zeros((), np.int32), sh.step)
        self.state = TrainState(step=step, params=params, opt_state=opt_state)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        sharding = self.layout.batch_sharding()
        b = self.cfg.data.global_batch
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]), (b,) + local[k].shape[1:])
                for k in BATCH_KEYS}

    def compile(self, batch: dict[str, jax.Array]) -> float:
        """Compile ahead of the first step; returns seconds spent."""
        start = time.perf_counter()
        self.step_fn = self.step_fn.lower(self.state, batch).compile()
        return time.perf_counter() - start

    def step(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.state, metrics = self.step_fn(self.state, batch)
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


def train(cfg: Config, source: Iterator[dict] | None = None, devices: list | None = None,
          out: Callable[[str], None] = print, resume: bool = True) -> dict:
    """Train per ``cfg``, resuming from the run dir's latest complete checkpoint unless ``resume`` is False.

    Returns the summary (also printed as one line); ``summary["preempted"]`` is True when SIGTERM
    stopped the run after a final checkpoint.
    """
    is_main = jax.process_index() == 0
    say = out if is_main else (lambda _: None)
    if not resume:
        refuse_existing(cfg)
    check_host_memory(cfg)
    trainer = Trainer.build(cfg, devices, init=False)  # state filled below: restored, or initialized
    run_dir = prepare_run_dir(cfg)
    if source is None:
        from jaxllama.data.sources import make_source

        source = make_source(cfg)
    if getattr(source, "tok", None) is not None and is_main and not (run_dir / "tokenizer").exists():
        from jaxllama.data.tokenizers import copy_tokenizer

        copy_tokenizer(source.tok, run_dir / "tokenizer")
    from jaxllama.train.evaluate import Evaluator, wants_eval

    evaluator = Evaluator(cfg, trainer) if wants_eval(cfg) else None
    eval_result: dict = {}
    extra: dict = {}  # one-off figures (checkpoint blocking time) for the next metrics record
    a, d, t, c = trainer.arch, cfg.data, cfg.train, cfg.checkpoint
    ckpts = TrainCheckpoints(checkpoint_dir(cfg, run_dir), c, say) if c.enabled else None
    start = 0
    restored = ckpts.restore_latest(trainer.state, trainer.state_shardings, cfg.model) if ckpts else None
    if restored is not None:
        start, trainer.state, data_state = restored
        source.restore(data_state)
        say(f"resumed from the checkpoint at step {start} in {ckpts.directory}")
    else:
        trainer.initialize(say)
        if t.init_from:
            say(f"initialized the parameters from {t.init_from}")
    if is_main:
        trim_metrics(run_dir, start)
    if start >= t.steps:
        if ckpts:
            ckpts.close()
        say(f"done: already trained to step {start} (train.steps={t.steps}); run dir {run_dir}")
        return dict(steps=start, history=[], run_dir=str(run_dir), preempted=False, resumed_from=start,
                    line=f"already at step {start}")
    n_dev = trainer.layout.mesh.size
    peak, peak_src = peak_flops_per_device(t.peak_flops)
    flops = flops_per_token(a, d.seq_len)
    flops_nc = flops_per_token(a, d.seq_len, causal=False)
    writer = MetricsWriter(run_dir, enabled=is_main, tensorboard=t.tensorboard)
    mesh_desc = ", ".join(f"{k}={v}" for k, v in trainer.layout.mesh.shape.items())
    say(f"jaxllama: {cfg.model.preset} ({a.dtype} compute, attention {a.attention}) on {n_dev} "
        f"{jax.devices()[0].platform} device(s), mesh {mesh_desc}; run dir {run_dir}")
    if hasattr(source, "describe"):
        say(source.describe())
    say(f"peak FLOP/s per device: {peak:.3g}, {peak_src}")

    batch = trainer.global_batch(next(source))
    say(f"compiled the train step in {trainer.compile(batch):.1f}s")
    progress = Progress(t.steps - start, t.progress and is_main, say)
    tokens_per_step = d.global_batch * d.seq_len
    pending: list = []
    history: list[dict] = []
    bad_in_row = skipped = skipped_records = 0
    preempted = False
    last_time = time.perf_counter()
    try:
        with PreemptionWatch() as watch:
            for step in range(start, t.steps):
                if step > start:
                    batch = trainer.global_batch(next(source))
                pending.append(trainer.step(batch))
                done = step + 1
                preempted = watch.reached(done)
                if ckpts and (preempted or done == t.steps or (c.every and done % c.every == 0)):
                    # Steps are dispatched ahead: wait for them to finish computing first, so the figure
                    # below is the save's own cost, not the queued steps' compute time.
                    jax.block_until_ready(trainer.state)
                    blocked = ckpts.save(done, trainer.state, cfg, getattr(source, "state", dict)())
                    extra["checkpoint_block_s"] = blocked  # logged with the next record
                    say(f"checkpoint at step {done}: the save blocked training for {1000 * blocked:.0f} ms"
                        f"{' (written in the background)' if c.async_save else ''}")
                if evaluator and evaluator.due(done):
                    eval_start = time.perf_counter()
                    eval_result = evaluator(trainer.state.params)  # logged with the next record
                    eval_result["eval_time_s"] = time.perf_counter() - eval_start
                    last_time += eval_result["eval_time_s"]  # throughput counts training time only
                if done % t.log_every and done != t.steps and not preempted:
                    continue
                fetched = jax.device_get(pending)
                pending = []
                now = time.perf_counter()
                elapsed, last_time = now - last_time, now
                for m in fetched:
                    bad_in_row = 0 if m["finite"] else bad_in_row + 1
                    skipped += 1 - int(m["finite"])
                finite = [m for m in fetched if m["finite"]]
                tps = tokens_per_step * len(fetched) / elapsed
                record = dict(
                    step=done,
                    loss=float(np.mean([m["loss"] for m in finite])) if finite else math.nan,
                    grad_norm=float(np.mean([m["grad_norm"] for m in finite])) if finite else math.nan,
                    lr=float(fetched[-1]["lr"]), tokens_per_s=tps,
                    mfu=tps / n_dev * flops / peak if peak else 0.0,
                    mfu_noncausal=tps / n_dev * flops_nc / peak if peak else 0.0,
                    step_time_s=elapsed / len(fetched), skipped_nonfinite=skipped)
                if hasattr(source, "efficiency"):
                    record["packing_efficiency"] = source.efficiency
                if getattr(source, "bad", None) is not None and source.bad.count:  # data.skip_bad_records
                    if source.bad.count > skipped_records:
                        say(f"skipped {source.bad.count} bad records so far (last: {source.bad.last})")
                    skipped_records = record["data_skipped"] = source.bad.count
                record.update(eval_result, **extra)
                eval_result, extra = {}, {}
                writer.write(record)
                progress.update(record, len(fetched))
                history.append(record)
                if bad_in_row >= t.max_nonfinite:
                    raise RunError(f"loss was not finite for {bad_in_row} steps in a row (up to step {done}); "
                                   f"stopping (train.max_nonfinite={t.max_nonfinite}); try a lower optim.lr")
                if preempted:
                    break
    finally:
        progress.close()
        writer.close()
        if ckpts:
            ckpts.close()  # waits for a save in flight, so a finished run always ends with a complete checkpoint
    summary = summarize(history, t.steps, run_dir)
    summary.update(preempted=preempted, resumed_from=start,
                   checkpoint_block_s=ckpts.block_times if ckpts else [])
    if preempted:
        saved = ("checkpoint saved and complete; run the same command to resume" if ckpts
                 else "nothing saved (checkpoint.enabled=false)")
        summary["line"] = f"preempted (SIGTERM) at step {history[-1]['step']}: {saved}; run dir {run_dir}"
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
