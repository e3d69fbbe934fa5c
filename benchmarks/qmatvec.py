"""Quantized matrix-vector products on CPU: GB/s of weights read, jaxllama's native kernel vs XLA and torch.

Why this exists: batch-1..16 decoding reads every weight once per step, so its speed is the
bandwidth at which a matmul of a few rows reads its weights. The set is the 135M Llama's: 30
layers of q/k/v/o/gate/up/down (576x576, 576x192 x2, 576x576, 576x1536 x2, 1536x576) and the
49152x576 head, all distinct arrays (~540 MB float32, ~135 MB int8), so nothing stays in cache.
One timed pass is one decoding step's products for ``rows`` rows (one jitted function), chained as
a step chains them (q/k/v from the residual, o from attention's output, gate/up, down, the head),
so XLA cannot run every product at once as it could independent ones. Reported per
method and rows: ms of the best pass of ``--reps`` in each of ``--rounds`` rounds over all methods
(the medians too, in the JSON lines: on a shared machine the best is the least disturbed) and GB/s of weight bytes (quantized bytes + scales) read
a second at that speed.

Methods: ``f32-xla`` (``x @ W``), ``<format>-kernel`` (:func:`jaxllama.model.cpu_kernels.qmatmul`),
``<format>-xla`` (quant.matmul's XLA path: the same call with the kernel turned off), ``torch-f32``
(``x @ W.T``, 2 threads), ``torch-int8`` (``torch._weight_int8pack_mm``, per-row scales). Formats:
``int8`` (a scale per row), ``int8-g32``, ``int4-g32``, ``int4-g128`` (128 where it divides the
input, down_proj's 1536; 64 for the 576-input matrices, as 576 is not a multiple of 128).

    python benchmarks/qmatvec.py                      # --rows 1,4,16 --reps 10 --rounds 3 --methods ...
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

LAYERS, D, F, VOCAB = 30, 576, 1536, 49152
LAYER_SHAPES = [(D, D), (D, 192), (D, 192), (D, D), (D, F), (D, F), (F, D)]  # (in, out)
QUANT = {"int8": ("int8", 0), "int8-g32": ("int8", 32), "int4-g32": ("int4", 32), "int4-g128": ("int4", 128)}
DEFAULT = ["f32-xla", "int8-kernel", "int8-xla", "int8-g32-kernel", "int4-g32-kernel", "int4-g32-xla",
           "int4-g128-kernel", "int4-g128-xla", "torch-f32", "torch-int8"]


def shapes(layers: int) -> list[tuple[int, int]]:
    return [s for _ in range(layers) for s in LAYER_SHAPES] + [(D, VOCAB)]


def _times(fn, reps: int, budget_s: float = 8.0) -> tuple[float, float]:
    """(best, median) seconds of ``reps`` calls after a warm-up (fewer if they pass ``budget_s``).
    The best is what the table reports: on a shared machine it is the least disturbed run."""
    fn()
    ts, end = [], time.perf_counter() + budget_s
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
        if start > end and len(ts) >= 3:
            break
    return float(np.min(ts)), float(np.median(ts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="passes over all methods; the best of each is reported")
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--methods", default=",".join(DEFAULT))
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import torch

    from jaxllama.model import cpu_kernels, quant

    torch.set_num_threads(2)
    methods = args.methods.split(",")
    rows_list = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    floats = [(rng.standard_normal(s, np.float32) / np.sqrt(s[0])).astype(np.float32) for s in shapes(args.layers)]
    print(json.dumps({"native": cpu_kernels.available(), "isa": cpu_kernels._state.get("isa"),
                      "matrices": len(floats), "f32_MB": round(sum(w.nbytes for w in floats) / 1e6, 1),
                      "xla_threads": jax.device_count(), "torch_threads": torch.get_num_threads()}), flush=True)

    quantized: dict[str, list] = {}

    def qweights(name):
        if name not in quantized:
            mode, group = QUANT[name]
            qz = jax.jit(quant.quantize, static_argnums=(1, 2))
            quantized[name] = [tuple(jax.block_until_ready(qz(w, mode, group if not group or w.shape[0] % group == 0 else 64)))
                               for w in floats]
        return quantized[name]

    def chain(mv, ws, h, tile):
        """One decoding step's products, with its dependencies: q/k/v from h, o from q's output (k
        and v folded in, as attention would), gate/up from the residual, down from their product,
        the head from the last residual. ``tile(y, n)`` repeats y's last axis n times."""
        for i in range(0, len(ws) - 1, 7):
            wq, wk, wv, wo, wg, wu, wd = ws[i:i + 7]
            a = mv(h, wq) + 1e-3 * tile(mv(h, wk) + mv(h, wv), 3)
            h = h + 1e-3 * mv(a, wo)
            h = h + 1e-3 * mv(mv(h, wg) * mv(h, wu), wd)
        return mv(h, ws[-1])

    def jax_run(ws, mv, x):
        jf = jax.jit(lambda ws, x: chain(mv, ws, x, lambda y, n: jnp.tile(y, (1, n))))
        return lambda: jax.block_until_ready(jf(ws, x))

    runs = []  # (method, rows, weight bytes, the pass)
    torch_weights: dict = {}
    for method in methods:
        for rows in rows_list:
            x_np = rng.standard_normal((rows, D), np.float32)
            x = jnp.asarray(x_np)
            if method == "f32-xla":
                nbytes = sum(w.nbytes for w in floats)
                run = jax_run([jnp.asarray(w) for w in floats], lambda x, w: x @ w, x)
            elif method.endswith("-kernel") or method.endswith("-xla"):
                name = method.rsplit("-", 1)[0]
                mode = QUANT[name][0]
                ws = qweights(name)
                nbytes = sum(q.nbytes + s.nbytes for q, s in ws)
                if method.endswith("-kernel"):
                    if not cpu_kernels.available():
                        continue
                    run = jax_run(ws, lambda x, w, mode=mode: cpu_kernels.qmatmul(x, w[0], w[1], mode), x)
                else:  # quant.matmul with the native kernel turned off while it traces
                    def mv(x, w):
                        saved = cpu_kernels.wanted
                        cpu_kernels.wanted = lambda rows, dtype: False
                        try:
                            return quant.matmul(x, w[0], w[1], jnp.float32)
                        finally:
                            cpu_kernels.wanted = saved

                    run = jax_run(ws, mv, x)
            elif method in ("torch-f32", "torch-int8"):
                if method not in torch_weights:
                    torch_weights[method] = (
                        [torch.from_numpy(np.ascontiguousarray(w.T)) for w in floats]  # [out, in], nn.Linear's
                        if method == "torch-f32" else
                        [(torch.from_numpy(np.array(q)), torch.from_numpy(np.array(s)[:, 0])) for q, s in qweights("int8")])
                tw = torch_weights[method]
                if method == "torch-f32":
                    nbytes = sum(w.nbytes for w in floats)
                    mv = torch.nn.functional.linear
                else:
                    nbytes = sum(q.nbytes + s.nbytes for q, s in tw)
                    mv = lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1])  # noqa: E731

                def run(tw=tw, tx=torch.from_numpy(x_np), mv=mv):
                    with torch.inference_mode():
                        chain(mv, tw, tx, lambda y, n: y.repeat(1, n))
            else:
                raise SystemExit(f"unknown method {method}")
            runs.append((method, rows, nbytes, run))

    best: dict = {}
    for rnd in range(args.rounds):  # rounds interleave the methods in time (the machine's load drifts)
        for method, rows, nbytes, run in runs:
            t, med = _times(run, args.reps)
            row = {"round": rnd, "method": method, "rows": rows, "ms": round(t * 1e3, 2),
                   "GB/s": round(nbytes / t / 1e9, 2), "median_ms": round(med * 1e3, 2), "MB": round(nbytes / 1e6, 1)}
            print(json.dumps(row), flush=True)
            if (method, rows) not in best or row["ms"] < best[method, rows]["ms"]:
                best[method, rows] = row
    print()
    print("| method | MB | " + " | ".join(f"rows {r}: ms / GB/s" for r in rows_list) + " |")
    print("|---|---|" + "---|" * len(rows_list))
    for method in methods:
        cells = {r: best[method, r] for r in rows_list if (method, r) in best}
        if cells:
            mb = next(iter(cells.values()))["MB"]
            print(f"| {method} | {mb:,.0f} | " + " | ".join(
                f"{cells[r]['ms']:.1f} / {cells[r]['GB/s']:.1f}" if r in cells else "-" for r in rows_list) + " |")


if __name__ == "__main__":
    main()
