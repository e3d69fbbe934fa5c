"""XLA:CPU vs PyTorch (MKL) on the matrix products of one 135M training step (one JSON line).

Why this exists: on this CPU a jaxllama train step is almost all GEMM, so its speed against a
PyTorch peer is bounded by how fast XLA's CPU GEMM is against MKL's on the same shapes. Each product
of a step (tokens T = batch x seq) is timed in both, in the same process, interleaved: the forward
``x @ W``, the input gradient ``dy @ W.T`` and the weight gradient ``x.T @ dy``, for the block
projections and the tied head. Reported: GFLOP/s of each, and the FLOP-weighted ratio (XLA / torch)
over the products a LoRA step runs (forward and input gradients; the frozen kernels need no weight
gradient) and a full step (all three).

    python benchmarks/cpu_gemm.py --tokens 1024
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np

# (name, in, out, layers): the 135M shape's products, per layer for the blocks.
PROJ = [("q_proj", 576, 576, 30), ("kv_proj", 576, 192, 60), ("o_proj", 576, 576, 30),
        ("gate_up", 576, 1536, 60), ("down_proj", 1536, 576, 30), ("head", 576, 49152, 1)]


def _time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    rows, weights = [], {"lora": [0.0, 0.0], "full": [0.0, 0.0]}
    for name, d_in, d_out, count in PROJ:
        x, w = rng.standard_normal((args.tokens, d_in), np.float32), rng.standard_normal((d_in, d_out), np.float32)
        dy = rng.standard_normal((args.tokens, d_out), np.float32)
        if name == "head":  # tied: the embedding [vocab, dim] is the kernel's transpose, as both models hold it
            w = np.ascontiguousarray(w.T)
        tx, tw, tdy = (torch.from_numpy(a) for a in (x, w, dy))
        jx, jw, jdy = (jnp.asarray(a) for a in (x, w, dy))
        if name == "head":
            forms = {"fwd": lambda x, w, dy: x @ w.T, "dx": lambda x, w, dy: dy @ w, "dw": lambda x, w, dy: dy.T @ x}
        else:
            forms = {"fwd": lambda x, w, dy: x @ w, "dx": lambda x, w, dy: dy @ w.T, "dw": lambda x, w, dy: x.T @ dy}
        flops = 2 * args.tokens * d_in * d_out
        for form, fn in forms.items():
            jf = jax.jit(fn)
            t_torch = _time(functools.partial(fn, tx, tw, tdy), args.reps)
            t_xla = _time(functools.partial(lambda f, *a: f(*a).block_until_ready(), jf, jx, jw, jdy), args.reps)
            rows.append(dict(product=name, form=form, xla_gflops=round(flops / t_xla / 1e9, 1),
                             torch_gflops=round(flops / t_torch / 1e9, 1)))
            for step in ("full",) + (("lora",) if form != "dw" else ()):
                weights[step][0] += count * t_xla
                weights[step][1] += count * t_torch
    print(json.dumps(dict(tokens=args.tokens, threads=torch.get_num_threads(), products=rows,
                          ratio_lora_step=round(weights["lora"][1] / weights["lora"][0], 3),
                          ratio_full_step=round(weights["full"][1] / weights["full"][0], 3))))


if __name__ == "__main__":
    main()
