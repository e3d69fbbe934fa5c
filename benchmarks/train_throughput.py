"""Training throughput and MFU for a preset, mesh, seq_len and batch: one JSON line.

    python benchmarks/train_throughput.py --preset tiny --seq-len 128 --batch 16 --torch

With ``--torch`` the same architecture (Hugging Face ``LlamaForCausalLM``, PyTorch, AdamW) trains
on the same batch shape in a subprocess started by this run, so the two figures share the machine's
state but not a heap. Every process gets the host-malloc setting of ``jaxllama/host_malloc.py``. Both
MFUs use ARCHITECTURE.md's FLOPs per token and the same peak; ``ratio`` = jaxllama / torch tokens/s.
With ``--maxtext PYTHON`` MaxText's own train step (``benchmarks/maxtext_step.py``, run by that
Python: MaxText needs 3.12 and its own venv; the ``tiny`` shapes only) is timed in the same run.
``--rounds R`` interleaves the three R times (the 2-core dev box drifts by up to 2x over minutes)
and reports each one's median and the median of the per-round ratios.
Extra ``key=value`` arguments are jaxllama config overrides (e.g. ``model.dtype=bfloat16 mesh.tensor=2``).

    python benchmarks/train_throughput.py --preset tiny --seq-len 256 --batch 8 --torch \
        --maxtext /work/mtvenv/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# Before numpy and JAX start threads, as the `jaxllama` command does (jaxllama/host_malloc.py); the
# transformers step runs in this process with the same setting, MaxText's subprocess gets it as env.
from jaxllama.host_malloc import ENV as MALLOC_ENV, keep_freed_memory

keep_freed_memory()

import jax  # noqa: E402
import numpy as np

from jaxllama.config import load_config
from jaxllama.data.synthetic import SyntheticSource
from jaxllama.train.loop import Trainer
from jaxllama.plan import flops_per_token
from jaxllama.train.metrics import peak_flops_per_device


def jaxllama_runner(cfg, warmup: int, steps: int):
    """Build and compile once; each call of the returned function times ``steps`` more steps."""
    trainer = Trainer.build(cfg)
    src = SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.global_batch, seed=0)
    batches = [trainer.global_batch(next(src)) for _ in range(2)]
    compile_s = trainer.compile(batches[0])

    def run() -> dict:
        for i in range(warmup):
            metrics = trainer.step(batches[i % 2])
        jax.block_until_ready(metrics)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for i in range(steps):
            metrics = trainer.step(batches[i % 2])
        jax.block_until_ready((metrics, trainer.state))
        elapsed = time.perf_counter() - start
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
        return dict(tokens_per_s=steps * cfg.data.global_batch * cfg.data.seq_len / elapsed, compile_s=compile_s,
                    page_faults_per_step=faults,
                    final_loss=float(metrics["loss"]), arch=trainer.arch, devices=trainer.layout.mesh.size)

    return run


def bench_maxtext(python: str, seq_len: int, batch: int, warmup: int, steps: int) -> dict:
    """MaxText's own step for the ``tiny`` shapes, in its own interpreter (benchmarks/maxtext_step.py)."""
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maxtext_step.py")
    proc = subprocess.run([python, script, "--seq-len", str(seq_len), "--batch", str(batch), "--steps", str(steps),
                           "--warmup", str(warmup)], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **MALLOC_ENV), timeout=1800)
    if proc.returncode:
        raise SystemExit(f"maxtext_step.py failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_torch_process(args) -> dict:
    """:func:`bench_torch` in a fresh interpreter (this script with ``--torch-only``): PyTorch gets an
    allocator and thread pools of its own, as MaxText does, instead of sharing jaxllama's heap (whose
    fragmentation by the other framework's tensors cost the next round up to 11k page faults a step)."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--torch-only", "--preset", args.preset, "--seq-len",
           str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **MALLOC_ENV), timeout=1800)
    if proc.returncode:
        raise SystemExit(f"--torch-only failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_torch(arch, seq_len: int, batch: int, warmup: int, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxllama.convert.hf_names import hf_config_dict

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(arch), attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    src = SyntheticSource(arch.vocab_size, seq_len, batch, seed=0)
    data = [torch.from_numpy(np.concatenate([b["tokens"], b["targets"][:, -1:]], 1).astype(np.int64))
            for b in (src.batch(0), src.batch(1))]

    def step(ids):
        # input ids[:, :-1], labels ids[:, 1:]: the same seq_len tokens per row as jaxllama trains
        out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for i in range(warmup):
        step(data[i % 2])
    start = time.perf_counter()
    for i in range(steps):
        loss = step(data[i % 2])
    elapsed = time.perf_counter() - start
    return dict(tokens_per_s=steps * batch * seq_len / elapsed, final_loss=float(loss), threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--torch", action="store_true", help="also train HF transformers (PyTorch) in this run")
    p.add_argument("--maxtext", metavar="PYTHON", help="also time MaxText's step with this interpreter (its venv)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every framework (medians)")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)  # bench_torch_process's child
    p.add_argument("overrides", nargs="*", help="jaxllama config overrides")
    args = p.parse_args(argv)
    cfg = load_config(None, [f"model.preset={args.preset}", f"data.seq_len={args.seq_len}",
                             f"data.global_batch={args.batch}", "optim.warmup_steps=0", *args.overrides])
    if args.torch_only:
        from jaxllama.model.llama import Arch

        print(json.dumps(bench_torch(Arch.from_config(cfg.model), args.seq_len, args.batch, args.warmup, args.steps)))
        return
    if args.maxtext and args.preset != "tiny":
        raise SystemExit("--maxtext: benchmarks/maxtext_step.py builds the tiny preset's shapes only")
    peak, peak_src = peak_flops_per_device(cfg.train.peak_flops)
    run_ours = jaxllama_runner(cfg, args.warmup, args.steps)
    rounds: list[dict] = []
    for _ in range(args.rounds):
        r = dict(ours=run_ours())
        if args.torch:
            r["torch"] = bench_torch_process(args)
        if args.maxtext:
            r["maxtext"] = bench_maxtext(args.maxtext, args.seq_len, args.batch, args.warmup, args.steps)
        rounds.append(r)
    ours = rounds[-1]["ours"]
    arch = ours["arch"]
    flops = flops_per_token(arch, args.seq_len)
    n = ours["devices"]
    med = lambda xs: float(np.median(xs))  # noqa: E731
    ours_tps = med([r["ours"]["tokens_per_s"] for r in rounds])
    result = dict(preset=args.preset, seq_len=args.seq_len, batch=args.batch, dtype=arch.dtype,
                  attention=arch.attention, backend=jax.default_backend(), devices=n,
                  device_kind=jax.devices()[0].device_kind, peak_flops_per_device=peak, peak_source=peak_src,
                  flops_per_token=flops, rounds=args.rounds, jaxllama_tokens_per_s=round(ours_tps, 1),
                  jaxllama_rounds=[round(r["ours"]["tokens_per_s"], 1) for r in rounds],
                  jaxllama_mfu=round(ours_tps / n * flops / peak, 4) if peak else None,
                  jaxllama_compile_s=round(ours["compile_s"], 2),
                  jaxllama_page_faults_per_step=[round(r["ours"]["page_faults_per_step"]) for r in rounds])
    if args.torch:
        theirs = med([r["torch"]["tokens_per_s"] for r in rounds])
        host_peak = peak * jax.local_device_count() if jax.default_backend() == "cpu" else peak
        result.update(torch_tokens_per_s=round(theirs, 1),
                      torch_rounds=[round(r["torch"]["tokens_per_s"], 1) for r in rounds],
                      torch_mfu=round(theirs * flops / host_peak, 4) if peak else None,
                      torch_threads=rounds[-1]["torch"]["threads"],
                      ratio=round(med([r["ours"]["tokens_per_s"] / r["torch"]["tokens_per_s"] for r in rounds]), 3))
    if args.maxtext:
        result.update(maxtext_tokens_per_s=round(med([r["maxtext"]["maxtext_tokens_per_s"] for r in rounds]), 1),
                      maxtext_rounds=[round(r["maxtext"]["maxtext_tokens_per_s"], 1) for r in rounds],
                      maxtext_version=rounds[-1]["maxtext"].get("maxtext_version"),
                      maxtext_jax=rounds[-1]["maxtext"].get("jax_version"),
                      ratio_maxtext=round(med([r["ours"]["tokens_per_s"] / r["maxtext"]["maxtext_tokens_per_s"]
                                               for r in rounds]), 3))
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
