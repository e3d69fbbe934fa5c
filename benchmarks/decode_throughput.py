"""Prefill and decode tokens/s of jaxllama's engine vs Hugging Face ``generate``, same weights, same run.

    python benchmarks/decode_throughput.py                       # tiny preset, random weights, CPU
    python benchmarks/decode_throughput.py --preset llama3.2-1b --dtype bfloat16 --hf none   # GPU

Prints one JSON line. Both sides are timed the same way, after a warm-up (compilation) run:
``generate(max_new_tokens=1)`` is the prefill (plus one token), and decode tokens/s is
``batch * (N - 1) / (t(N) - t(1))``: the extra time the N-1 further tokens took (medians of
alternated runs). Greedy, no stop
tokens, every row generates exactly N tokens. With ``--hf none`` (no PyTorch, e.g. the GPU
machine) only jaxllama is timed; on an accelerator the line adds the weight-bandwidth bound:
batch-1 decode reads every weight once per token, so tokens/s x weight bytes / HBM bandwidth is
the fraction of the bound reached. Transformers gets the better of 1 and all torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllama.config import load_config  # noqa: E402
from jaxllama.infer.engine import Engine  # noqa: E402
from jaxllama.infer.placement import inference_arch, inference_program, param_shardings  # noqa: E402
from jaxllama.infer.sampling import Sampling  # noqa: E402
from jaxllama.model.llama import Arch, Llama, stack_layers, unstack_layers  # noqa: E402

# Peak HBM bandwidth (bytes/s) by device kind, for the bandwidth-bound figure.
HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
GREEDY = Sampling(temperature=0)


def random_weights(a: Arch, layout, seed: int = 0):
    """Random parameters with O(1) activations (std 1/sqrt(fan_in)), created in their shards on device."""
    boxed = jax.eval_shape(lambda: Llama(a).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    shapes = jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, boxed,
                          is_leaf=lambda x: hasattr(x, "value"))
    shardings = param_shardings(a, layout)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def make(key, leaf, path_is_scale, fan_in):
        if path_is_scale:
            return jnp.ones(leaf.shape, leaf.dtype)
        return (jax.random.normal(key, leaf.shape, jnp.float32) / np.sqrt(fan_in)).astype(leaf.dtype)

    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    out = []
    for key, leaf, path, sh in zip(keys, leaves, paths, jax.tree.leaves(shardings)):
        name = path[-1].key
        fan_in = 1 if name in ("embedding", "scale") else leaf.shape[-2]
        out.append(jax.jit(make, static_argnums=(1, 2, 3), out_shardings=sh)(key, leaf, name == "scale", fan_in))
    return jax.tree.unflatten(tree, out)


def time_jax(engine: Engine, prompts, new: int, repeats: int) -> tuple[float, float]:
    engine.generate(prompts, 1, GREEDY)
    engine.generate(prompts, new, GREEDY)  # compile both shapes
    return _paired(lambda: engine.generate(prompts, 1, GREEDY), lambda: engine.generate(prompts, new, GREEDY), repeats)


def time_hf(model, prompts, new: int, repeats: int) -> tuple[float, float]:
    import torch

    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)

    def gen(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    gen(1), gen(new)
    return _paired(lambda: gen(1), lambda: gen(new), repeats)


def _paired(short, long, repeats: int) -> tuple[float, float]:
    """Median times of the 1-token and N-token runs, alternated so machine noise hits both alike."""
    t1, tn = [], []
    for _ in range(repeats):
        t1.append(_timed(short))
        tn.append(_timed(long))
    return float(np.median(t1)), float(np.median(tn))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rates(batch: int, prompt_len: int, new: int, t1: float, tn: float) -> dict:
    """Decode is None when the N-token run was not measurably slower (raise --new-tokens)."""
    decode = batch * (new - 1) / (tn - t1) if tn > t1 else None
    return {"prefill_tok_s": batch * prompt_len / t1, "decode_tok_s": decode}


def _round(d: dict) -> dict:
    return {k: None if v is None else round(v, 1) for k, v in d.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a / b, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model preset with random weights (default tiny)")
    ap.add_argument("--model", help="a checkpoint path instead of a preset (anything `jaxllama generate` loads)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bf16 elsewhere)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mesh", default=None, help="e.g. tensor=4 (default: one device)")
    ap.add_argument("--hf", default="torch", choices=("torch", "none"), help="time transformers too (CPU)")
    args = ap.parse_args()

    from jaxllama.infer.placement import parse_mesh, place_params

    if args.model:
        from jaxllama.convert import load_model

        loaded = load_model(args.model)
        a = inference_arch(Arch.from_config(loaded.model_cfg), args.dtype, scan_layers=False)
        layout = inference_program(a, parse_mesh(args.mesh) or {"data": 1, "fsdp": 1, "tensor": 1}).layout
        params = place_params(unstack_layers(loaded.params, a.n_layers), a, layout)
    else:
        m = load_config(None, [f"model.preset={args.preset}", "data.seq_len=8"]).model
        a = inference_arch(Arch.from_config(m), args.dtype, scan_layers=False)  # as `jaxllama generate` runs
        layout = inference_program(a, parse_mesh(args.mesh) or {"data": 1, "fsdp": 1, "tensor": 1}).layout
        params = random_weights(a, layout)
    engine = Engine(params, a, layout)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    hf = None
    if args.hf == "torch":
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from jaxllama.convert.hf_names import hf_config_dict, to_hf_tensors

        hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(a))).eval()
        state = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v, np.float32)))
                 for k, v in to_hf_tensors(stack_layers(params, a.n_layers), a)}
        if a.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        hf.load_state_dict(state, strict=False)
        hf = hf.to(torch.bfloat16 if a.dtype == "bfloat16" else torch.float32)

    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    record = {"bench": "decode_throughput", "model": args.model or args.preset, "params": n_params,
              "dtype": a.dtype, "device": f"{device.platform}:{device.device_kind}", "n_devices": layout.mesh.size,
              "cpu_threads": os.cpu_count(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = rng.integers(3, a.vocab_size, size=(b, args.prompt_len)).tolist()
        ours = rates(b, args.prompt_len, args.new_tokens, *time_jax(engine, prompts, args.new_tokens, args.repeats))
        record[f"jaxllama_b{b}"] = _round(ours)
        if hf is not None:
            # PyTorch's thread pool can lose badly on small ops when cores are shared: give transformers
            # its best of 1 thread and all threads, per figure.
            import torch

            tries = []
            for threads in sorted({1, torch.get_num_threads()}):
                torch.set_num_threads(threads)
                tries.append(rates(b, args.prompt_len, args.new_tokens,
                                   *time_hf(hf, prompts, args.new_tokens, args.repeats)))
            theirs = {k: max((t[k] for t in tries if t[k] is not None), default=None) for k in tries[0]}
            record[f"hf_b{b}"] = _round(theirs)
            record[f"decode_ratio_b{b}"] = _ratio(ours["decode_tok_s"], theirs["decode_tok_s"])
            record[f"prefill_ratio_b{b}"] = _ratio(ours["prefill_tok_s"], theirs["prefill_tok_s"])
        if b == 1 and device.platform != "cpu":
            peak = next((v for k, v in HBM.items() if k in device.device_kind), None)
            if peak and ours["decode_tok_s"] is not None:
                record["bandwidth_fraction_b1"] = round(ours["decode_tok_s"] * weight_bytes / layout.mesh.size
                                                        / peak, 3)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
