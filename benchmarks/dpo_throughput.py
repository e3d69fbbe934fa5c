"""DPO training speed per reference mode, against SFT on the same rows (one JSON line).

The 135M shape (dim 576, 30 layers, 9/3 heads, ffn 1536, vocab 49152, tied; random weights), seq x batch
rows each packed with preference pairs (random tokens, responses masked) exactly as the data pipeline
packs them. Variants, each in its own process, one device, float32: ``sft`` (LoRA, the next-token loss
on the same rows), ``dpo_base`` (LoRA, the reference is the base without adapters: a second forward
pass), ``dpo_cached`` (LoRA, reference log-probabilities in the batch: no reference pass),
``dpo_separate`` (full fine-tuning, a separate frozen reference), ``simpo`` and ``orpo`` (LoRA, no
reference).
Reported: tokens/s (of row positions), and per-device memory from ``jaxllama info``'s plan.

    python benchmarks/dpo_throughput.py --seq-len 256 --batch 4 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPE = ["model.preset=debug", "model.dim=576", "model.n_layers=30", "model.n_heads=9", "model.n_kv_heads=3",
         "model.head_dim=64", "model.ffn_dim=1536", "model.vocab_size=49152", "model.tie_embeddings=true",
         "model.max_position=2048", "model.rope_theta=100000"]
LORA = ["train.lora.rank=16", "train.lora.alpha=32"]
VARIANTS = {"sft": LORA, "dpo_base": [*LORA, "train.objective=dpo", "train.dpo.reference=base"],
            "dpo_cached": [*LORA, "train.objective=dpo", "train.dpo.reference=cached"],
            "dpo_separate": ["train.objective=dpo", "train.dpo.reference=separate"],
            "simpo": [*LORA, "train.objective=simpo"], "orpo": [*LORA, "train.objective=orpo"]}


def pair_rows(seq_len: int, rows: int, pairs_per_row: int, seed: int = 0) -> dict[str, np.ndarray]:
    from jaxllama.data.packing import Packer

    rng = np.random.default_rng(seed)
    packer = Packer(seq_len, max_segments=2 * pairs_per_row)
    while len(packer.ready) < rows:
        prompt = rng.integers(3, 49152, rng.integers(seq_len // 8, seq_len // 4))
        sides = []
        for _ in range(2):
            resp = rng.integers(3, 49152, rng.integers(seq_len // 16, seq_len // 5))
            ids = np.concatenate([prompt, resp])
            sides += [ids, np.r_[np.zeros(prompt.size), np.ones(resp.size)]]
        packer.add_pair(*sides)
    return packer.pop(rows)


def run_one(name: str, args) -> dict:
    import jax

    from jaxllama.config import load_config
    from jaxllama.plan import plan
    from jaxllama.program import build_program

    extra = VARIANTS[name]
    pref = name != "sft"
    overrides = [*SHAPE, f"data.seq_len={args.seq_len}", f"data.global_batch={args.batch}", "optim.warmup_steps=0",
                 "mesh.fsdp=1", *extra]
    if pref:  # validated as a preference run; the rows are built here, so no file is read
        overrides += ["data.format=preference", f"data.source={__file__}"]
        if name == "dpo_separate":
            overrides += [f"train.dpo.reference_path={__file__}"]
    cfg = load_config(None, overrides)
    program = build_program(cfg, jax.devices()[:1])
    state = program.init_state()
    if state.reference is None and program.state_shardings.reference is not None:  # random reference weights
        state = state.replace(reference=program.init_state(seed=1).params)
    rows = [pair_rows(args.seq_len, args.batch, cfg.data.pairs_per_row, seed=s) for s in (0, 1)]
    for r in rows:
        if program.batch.extra:
            r["ref_logps"] = np.random.default_rng(0).normal(-50, 5, (args.batch, 2 * cfg.data.pairs_per_row))
    batches = [program.batch.to_global(r) for r in rows]
    step = program.train_step.lower(state, batches[0]).compile()
    for i in range(args.warmup):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(args.steps):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready((m, state))
    elapsed = time.perf_counter() - start
    p = plan(cfg, 1, program=program)
    return dict(tokens_per_s=args.steps * args.batch * args.seq_len / elapsed, loss=float(m["loss"]),
                memory_gib=round(p["total_bytes"] / 2**30, 3), reference_gib=round(p["reference_bytes"] / 2**30, 3),
                trainable=int(p["trainable"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--one", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    out: dict = dict(shape="135M", seq_len=args.seq_len, batch=args.batch)
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        if r.returncode:
            raise SystemExit(f"{name} failed: {r.stderr.strip().splitlines()[-3:]}")
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    if "sft" in out:
        for name in VARIANTS:
            if name in out and name != "sft":
                out[name]["vs_sft"] = round(out[name]["tokens_per_s"] / out["sft"]["tokens_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
