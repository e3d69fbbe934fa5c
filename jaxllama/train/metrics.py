"""Peak FLOP/s per device (for MFU), and where metrics go (terminal, metrics.jsonl, TensorBoard).

:class:`MetricsLog` is the loop's logging component: it keeps step metrics on device until a log
step (no per-step host sync, so dispatch runs ahead of the accelerator), then writes one record and
stops the run after ``train.max_nonfinite`` non-finite steps in a row. FLOPs per token are
:func:`jaxllama.plan.flops_per_token`. Only process 0 writes files and prints.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.errors import RunError
from jaxllama.parallel.chips import chip_for
from jaxllama.plan import flops_per_token

def measure_cpu_flops(seconds: float = 0.5) -> float:
    """Sustained float32 matmul FLOP/s of this host (all cores), for MFU on CPU."""
    n = 512
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda m: m @ m)
    f(x).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(x).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def cpu_name() -> str:
    """This host's CPU model and the cores this process may use, e.g. ``Intel(R) Xeon(R) Processor x 2``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} x {cores}"


def cpu_peak_flops(cache: Path | None = None) -> tuple[float, str]:
    """The host's float32 matmul FLOP/s, measured once per CPU model and core count and kept in
    ``cache`` (default ``$JAXLLAMA_CACHE/cpu-peak.json``), so MFU on CPU compares between runs and
    across a resume. The best of five short measurements: the others are the noise of a shared host."""
    from jaxllama.data.tokenizer_train import default_cache_dir

    path = (cache or default_cache_dir()) / "cpu-peak.json"
    name = cpu_name()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(name) if isinstance(known, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0):
        entry = {"flops": max(measure_cpu_flops(0.2) for _ in range(5)), "date": time.strftime("%Y-%m-%d")}
        known = {**(known if isinstance(known, dict) else {}), name: entry}
        try:  # a cache that cannot be written only costs a measurement next time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass
    return float(entry["flops"]), f"measured on {entry['date']} (float32 matmul, {name}; cached in {path})"


def peak_flops_per_device(configured: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if configured:
        return configured, "configured (train.peak_flops)"
    kind = jax.devices()[0].device_kind
    chip = chip_for(kind)
    if chip is not None:
        return chip.peak_flops, f"table ({kind} bf16 dense)"
    if jax.default_backend() == "cpu":
        # Simulated CPU devices share the host's cores, so each gets an equal part of the host.
        flops, source = cpu_peak_flops()
        return flops / jax.local_device_count(), source
    return 0.0, f"unknown for {kind}: set train.peak_flops"


# what every train step reports; anything else in its metrics is logged as its mean over the interval
STEP_KEYS = frozenset({"loss", "grad_norm", "lr", "tokens", "finite"})

class MetricsWriter:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl, mirrored to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def beside_bars(out: Callable[[str], None]) -> Callable[[str], None]:
    """``out`` that clears a live progress bar first and redraws it after, so messages printed during
    training (checkpoints, evals) get lines of their own instead of landing inside the bar's line."""
    def say(line: str) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode():
            out(line)

    return say


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line per log step."""

    def __init__(self, total: int, enabled: bool, out: Callable[[str], None]):
        self.out = out
        self.bar = None
        # a terminal too narrow for a bar (or reporting width 0) gets plain lines: tqdm would show nothing
        if enabled and sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns >= 40:
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
        for key in sorted(set(fetched[-1]) - STEP_KEYS):  # the objective's own (preference: rewards, logps)
            record[key] = float(np.mean([m[key] for m in finite])) if finite else math.nan
        if self.source.efficiency is not None:
            record["packing_efficiency"] = self.source.efficiency
        encoder = getattr(self.source, "encoder", None)
        if encoder is not None and (encoder.truncated or encoder.dropped):
            record["data_truncated"], record["data_dropped"] = encoder.truncated, encoder.dropped
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
