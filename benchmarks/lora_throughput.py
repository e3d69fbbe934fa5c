"""LoRA vs full fine-tuning, jaxllama vs transformers + peft, on the same shapes and data (one JSON line).

Each variant runs in its own process (so its peak resident memory is its own): jaxllama full and
LoRA, and the peer, Hugging Face ``LlamaForCausalLM`` (PyTorch) full and with ``peft`` LoRA on the
same modules, rank and alpha, AdamW in both. Reported per variant: trainable parameters, optimizer
state bytes, peak RSS, tokens/s (median over --rounds interleaved rounds); ``ratio_lora`` =
jaxllama LoRA / peft LoRA tokens/s. Default shapes: the published 135M Llama (dim 576, 30 layers,
9/3 heads, ffn 1536, vocab 49152, tied), random weights.

    python benchmarks/lora_throughput.py --seq-len 256 --batch 4 --rank 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SHAPE = ["model.preset=debug", "model.dim=576", "model.n_layers=30", "model.n_heads=9", "model.n_kv_heads=3",
         "model.head_dim=64", "model.ffn_dim=1536", "model.vocab_size=49152", "model.tie_embeddings=true",
         "model.max_position=2048", "model.rope_theta=100000"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_jax(lora: bool, args) -> dict:
    import jax

    from jaxllama.config import load_config
    from jaxllama.data.synthetic import SyntheticSource
    from jaxllama.model.lora import count
    from jaxllama.train.loop import Trainer

    extra = [f"train.lora.rank={args.rank}", f"train.lora.alpha={2 * args.rank}"] if lora else []
    cfg = load_config(None, [*SHAPE, f"data.seq_len={args.seq_len}", f"data.global_batch={args.batch}",
                             "optim.warmup_steps=0", "mesh.fsdp=1", *extra])
    trainer = Trainer.build(cfg, devices=jax.devices()[:1])
    src = SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.global_batch, seed=0)
    batches = [trainer.global_batch(next(src)) for _ in range(2)]
    trainer.compile(batches[0])
    mem = trainer._compiled.memory_analysis()
    for i in range(args.warmup):
        m = trainer.step(batches[i % 2])
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(args.steps):
        m = trainer.step(batches[i % 2])
    jax.block_until_ready((m, trainer.state))
    elapsed = time.perf_counter() - start
    opt = sum(x.nbytes for x in jax.tree.leaves(trainer.state.opt_state))
    return dict(tokens_per_s=args.steps * args.batch * args.seq_len / elapsed, trainable=count(trainer.state.params),
                optimizer_bytes=opt, xla_temp_bytes=int(mem.temp_size_in_bytes), loss=float(m["loss"]))


def run_torch(lora: bool, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxllama.config import load_config
    from jaxllama.convert.hf_names import hf_config_dict
    from jaxllama.data.synthetic import SyntheticSource
    from jaxllama.model.llama import Arch

    torch.manual_seed(0)
    arch = Arch.from_config(load_config(None, SHAPE).model)
    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(arch), attn_implementation="sdpa")).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    src = SyntheticSource(arch.vocab_size, args.seq_len, args.batch, seed=0)
    data = [torch.from_numpy(np.concatenate([b["tokens"], b["targets"][:, -1:]], 1).astype(np.int64))
            for b in (src.batch(0), src.batch(1))]

    def step(ids):
        out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for i in range(args.warmup):
        step(data[i % 2])
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(data[i % 2])
    elapsed = time.perf_counter() - start
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return dict(tokens_per_s=args.steps * args.batch * args.seq_len / elapsed,
                trainable=sum(p.numel() for p in trainable), optimizer_bytes=opt_bytes, loss=float(loss),
                threads=torch.get_num_threads())


VARIANTS = {"jaxllama_full": (run_jax, False), "jaxllama_lora": (run_jax, True), "torch_full": (run_torch, False),
            "peft_lora": (run_torch, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--one", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    if args.one:
        fn, lora = VARIANTS[args.one]
        r = fn(lora, args)
        r["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(r))
        return
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name in args.variants.split(","):
            cmd = [sys.executable, __file__, "--one", name, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
                   "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
            if out.returncode:
                raise SystemExit(f"{name} failed: {out.stderr.strip().splitlines()[-1:]}")
            results.setdefault(name, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = dict(shape="135M (dim 576, 30 layers, 9/3 heads, ffn 1536, vocab 49152, tied)", seq_len=args.seq_len,
                   batch=args.batch, rank=args.rank, rounds=args.rounds)
    for name, runs in results.items():
        last = runs[-1]
        summary[name] = dict(tokens_per_s=round(float(np.median([r["tokens_per_s"] for r in runs])), 1),
                             rounds=[round(r["tokens_per_s"], 1) for r in runs], trainable=last["trainable"],
                             optimizer_mib=round(last["optimizer_bytes"] / 2**20, 2),
                             peak_rss_gib=round(max(r["peak_rss_bytes"] for r in runs) / 2**30, 2),
                             **({"xla_temp_gib": round(last["xla_temp_bytes"] / 2**30, 2)} if "xla_temp_bytes" in last
                                else {}))
    if "jaxllama_lora" in results and "peft_lora" in results:
        summary["ratio_lora"] = round(float(np.median([a["tokens_per_s"] / b["tokens_per_s"] for a, b in
                                                       zip(results["jaxllama_lora"], results["peft_lora"])])), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
