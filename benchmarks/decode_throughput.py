"""Prefill and decode tokens/s of jaxllama's engine vs Hugging Face ``generate`` and llama.cpp, same weights, same run.

    python benchmarks/decode_throughput.py                       # tiny preset, random weights, CPU
    python benchmarks/decode_throughput.py --shape 135m --batches 1,16 --new-tokens 64 --repeats 3 \
        --hf-threads 1,2 --llamacpp-threads 1,2 --quantize none,int8,int4 --group-size int4:32   # ~7 min, 2 cores
    python benchmarks/decode_throughput.py --shape 135m --batches 1 --hf none --llamacpp none --cli 1,129,257
    python benchmarks/decode_throughput.py --preset llama3.2-1b --dtype bfloat16 --hf none   # GPU

Prints one JSON line (stdout) and a readable table (stderr). Every engine is timed the same way,
after a warm-up (compilation) run: ``generate(max_new_tokens=1)`` is the prefill (plus one token),
and decode tokens/s is ``batch * (N - 1) / (t(N) - t(1))``: the extra time the N-1 further tokens
took (medians of alternated runs). Greedy, no stop tokens, every row generates exactly N tokens.
``--rounds R`` repeats the whole sequence of engines R times (ours, llama.cpp, transformers, ours,
...) so that machine noise hits all of them alike; each figure is then the best over rounds (the
least disturbed; on a shared 2-core machine a neighbour's job can slow one engine 4x for a while, and
llama.cpp's spinning thread pool suffers most), the per-round decode figures kept in the JSON.

Peers, on the same weights: transformers (``--hf torch``; the better of ``--hf-threads`` torch
thread counts) and llama.cpp through llama-cpp-python's low-level API (``--llamacpp``, CPU only):
the weights are exported to an f32 GGUF with our converter (a small SentencePiece vocabulary padded
to the model's vocab), quantized by llama.cpp itself to Q8_0 / Q4_0, and decoded with
``llama_decode`` one token per sequence per step (``n_seq_max`` = batch, one sequence id per row,
argmax of its logits), f32 KV cache, ``--threads`` threads. Quantized llama.cpp types run at batch 1
only (``--quant-batches``), as do ours with ``--quantize int8,int4``
(``jaxllama.infer.placement.quantize_for_inference``).

The bandwidth bound: batch-1 decode reads every weight once per token, so ``decode tok/s x weight
bytes / bandwidth`` is the fraction of the bound reached (at batch B the weights are read once per
step, i.e. weight bytes / B per token). On an accelerator the bandwidth is the HBM peak; on CPU it is
measured in the same run: a ``--threads``-thread ``torch.sum`` over a 1 GiB float32 tensor, best of 7,
before and after the timings (the better kept; both in the JSON).
Weight bytes: all parameters (a tied embedding once) at their stored size; for llama.cpp the GGUF's
tensor bytes; for ours quantized, the quantized tree's bytes (scales included). KV-cache reads are
not counted.

``--cli 1,129`` also times ``jaxllama generate`` itself as a user runs it, on a params dir of the same
weights (written under ``--work``): decode tok/s from the wall-time difference of two runs of
different lengths (process start, load and compilation included in both).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
PIECES = 1000  # SentencePiece vocabulary of the GGUF / CLI tokenizer (padded to the model's vocab)
LLAMA_QUANTS = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def shape_overrides(name: str) -> list[str]:
    if name == "135m":  # the published 135M Llama's shape, as the other benchmarks use it
        from dpo_throughput import SHAPE

        return list(SHAPE)
    raise SystemExit(f"--shape: unknown {name!r} (known: 135m)")


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


# ---- timing ---------------------------------------------------------------------------------------


def time_jax(engine: Engine, prompts, new: int, repeats: int, warm: bool = True) -> tuple[float, float]:
    if warm:
        engine.generate(prompts, 1, GREEDY)
        engine.generate(prompts, new, GREEDY)  # compile both shapes
    return _paired(lambda: engine.generate(prompts, 1, GREEDY), lambda: engine.generate(prompts, new, GREEDY), repeats)


def time_hf(model, prompts, new: int, repeats: int, warm: bool = True) -> tuple[float, float]:
    import torch

    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)

    def gen(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    if warm:
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


def read_bandwidth(threads: int, gib: float = 1.0, tries: int = 7) -> tuple[float, str]:
    """This machine's read bandwidth (bytes/s): best time of a ``threads``-thread sum over ``gib`` GiB of f32."""
    n = int(gib * 2**30) // 4
    try:
        import torch
    except ImportError:  # numpy's sum is one thread
        x = np.ones(n, np.float32)
        best = min(_timed(lambda: x.sum()) for _ in range(tries))
        return x.nbytes / best, "numpy.sum, 1 thread"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(n, dtype=torch.float32)
        x.sum()
        best = min(_timed(lambda: x.sum()) for _ in range(tries))
    finally:
        torch.set_num_threads(before)
    return n * 4 / best, f"torch.sum, {threads} threads"


# ---- llama.cpp ------------------------------------------------------------------------------------


def make_tokenizer(folder: Path) -> tuple[int, int, list[int]]:
    """A small SentencePiece BPE (byte fallback) trained on made-up words: the GGUF's (and the CLI's)
    vocabulary, padded to the model's by the exporter. Returns bos, eos and the control/unknown ids."""
    import sentencepiece as spm

    rng = random.Random(0)
    syl = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words = sorted({"".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(5000)})
    lines = [" ".join(rng.choices(words, k=12)) for _ in range(5000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=PIECES,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    special = [i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)]
    return sp.bos_id(), sp.eos_id(), special


def host_tree(params, a: Arch) -> dict:
    """The canonical (stacked) tree as numpy float32, for the exporters."""
    return jax.tree.map(lambda x: np.asarray(x, np.float32), stack_layers(params, a.n_layers))


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class LlamaCpp:
    """One llama.cpp model with one context per batch size; greedy decoding by ``llama_decode``."""

    def __init__(self, path: Path, threads: int, extra_bufts: bool, max_len: int):
        import llama_cpp

        self.low = low = llama_cpp.llama_cpp
        low.llama_backend_init()
        mp = low.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts  # off on AMX CPUs: llama.cpp's AMX repack path segfaults there
        self.model = low.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        self.n_vocab = low.llama_vocab_n_tokens(low.llama_model_get_vocab(self.model))
        self.threads = self.default_threads = threads
        self.max_len, self.ctxs = max_len, {}

    def set_threads(self, n: int) -> None:
        self.threads = n
        for ctx, _, _ in self.ctxs.values():
            self.low.llama_set_n_threads(ctx, n, n)

    def context(self, batch: int, prompt_len: int):
        if batch not in self.ctxs:
            low = self.low
            cp = low.llama_context_default_params()
            cp.n_seq_max = batch
            cp.n_ctx = batch * self.max_len
            cp.n_batch = max(batch * prompt_len, 512)
            cp.n_threads = cp.n_threads_batch = self.threads
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32: the cache in the weights' precision, as ours
            cp.no_perf = True
            ctx = low.llama_init_from_model(self.model, cp)
            if not ctx:
                raise SystemExit(f"llama.cpp: no context for batch {batch}")
            pre = low.llama_batch_init(batch * prompt_len, 0, 1)
            step = low.llama_batch_init(batch, 0, 1)
            for b, per in ((pre, prompt_len), (step, 1)):
                for i in range(batch * per):
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = i // per
            self.ctxs[batch] = (ctx, pre, step)
        return self.ctxs[batch]

    def generate(self, prompts: np.ndarray, new: int) -> np.ndarray:
        """Greedy: prefill all rows in one ``llama_decode``, then one token per row per step."""
        low = self.low
        batch, plen = prompts.shape
        ctx, pre, step = self.context(batch, plen)
        low.llama_memory_clear(low.llama_get_memory(ctx), True)
        n = batch * plen
        pre.n_tokens = n
        np.ctypeslib.as_array(pre.token, (n,))[:] = prompts.reshape(-1)
        np.ctypeslib.as_array(pre.pos, (n,))[:] = np.tile(np.arange(plen, dtype=np.int32), batch)
        last = np.zeros((batch, plen), np.int8)
        last[:, -1] = 1
        np.ctypeslib.as_array(pre.logits, (n,))[:] = last.reshape(-1)
        out = np.empty((batch, new), np.int32)
        self._decode(ctx, pre)
        out[:, 0] = self._argmax(ctx, batch)
        step.n_tokens = batch
        tok, pos = np.ctypeslib.as_array(step.token, (batch,)), np.ctypeslib.as_array(step.pos, (batch,))
        np.ctypeslib.as_array(step.logits, (batch,))[:] = 1
        for i in range(1, new):
            tok[:] = out[:, i - 1]
            pos[:] = plen + i - 1
            self._decode(ctx, step)
            out[:, i] = self._argmax(ctx, batch)
        return out

    def _decode(self, ctx, b) -> None:
        rc = self.low.llama_decode(ctx, b)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")

    def _argmax(self, ctx, batch: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.low.llama_get_logits(ctx), (batch, self.n_vocab)).argmax(-1)

    def close(self) -> None:
        for ctx, pre, step in self.ctxs.values():
            self.low.llama_batch_free(pre)
            self.low.llama_batch_free(step)
            self.low.llama_free(ctx)
        self.ctxs = {}
        self.low.llama_model_free(self.model)


def time_llamacpp(lc: LlamaCpp, prompts, new: int, repeats: int, warm: bool = True,
                  threads: list[int] | None = None) -> list[tuple[float, float]]:
    """(t1, tN) per thread count in ``threads`` (default: the model's)."""
    p = np.asarray(prompts, np.int32)
    if warm:
        lc.generate(p, 1), lc.generate(p, new)
    out = []
    for n in threads or [lc.threads]:
        lc.set_threads(n)
        out.append(_paired(lambda: lc.generate(p, 1), lambda: lc.generate(p, new), repeats))
    lc.set_threads(lc.default_threads)
    return out


def gguf_bytes(path: Path) -> int:
    import gguf

    return int(sum(t.n_bytes for t in gguf.GGUFReader(path).tensors))


def quantize_gguf(src: Path, dst: Path, kind: str, threads: int) -> Path:
    import llama_cpp

    q = llama_cpp.llama_model_quantize_default_params()
    q.ftype = getattr(llama_cpp, LLAMA_QUANTS[kind])
    q.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(q)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {kind}")
    return dst


def quiet_llama_cpp() -> None:
    """Silence llama.cpp's log (benchmarks/gguf_quantize.py uses it too)."""
    import llama_cpp

    low = llama_cpp.llama_cpp

    @low.llama_log_callback
    def _silent(level, text, user_data):  # noqa: ARG001
        pass

    quiet_llama_cpp.cb = _silent  # keep a reference: llama.cpp holds the pointer
    low.llama_log_set(_silent, None)


# ---- jaxllama quantized ---------------------------------------------------------------------------


def quantized_engine(params, a: Arch, layout, mode: str, group: int | None):
    try:
        from jaxllama.infer.placement import quantize_for_inference
    except ImportError:
        raise SystemExit(f"--quantize {mode}: this checkout has no jaxllama.infer.placement.quantize_for_inference "
                         f"yet (being written); run with --quantize none") from None
    qp, qa = quantize_for_inference(params, a, layout, mode, group)
    return Engine(qp, qa, layout), sum(x.nbytes for x in jax.tree.leaves(qp))


# ---- the CLI, as a user runs it -------------------------------------------------------------------


def time_cli(model_dir: Path, lengths: list[int], repeats: int, words: list[str]) -> dict:
    """Wall time of ``jaxllama generate`` (greedy) per --max-new-tokens, alternated; median per length."""
    exe = Path(sys.executable).parent / "jaxllama"
    prompt = " ".join(words)
    times: dict[int, list[float]] = {n: [] for n in lengths}
    counts: dict[int, int] = {}
    for _ in range(repeats):
        for n in lengths:
            cmd = [str(exe), "generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(n),
                   "--temperature", "0", "--json"]
            start = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            times[n].append(time.perf_counter() - start)
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stderr[-2000:]}")
            line = [x for x in r.stdout.splitlines() if x.startswith("{")][-1]
            counts[n] = len(json.loads(line).get("tokens", []))
    med = {n: float(np.median(t)) for n, t in times.items()}
    out = {"wall_s": {str(n): round(med[n], 2) for n in lengths}, "tokens": {str(n): counts[n] for n in lengths}}
    order = sorted(lengths)
    for lo, hi in zip(order, order[1:]):  # each consecutive pair: 1 -> 129 includes compiling the decode step
        dt = med[hi] - med[lo]
        out[f"decode_tok_s_{lo}_{hi}"] = round((counts[hi] - counts[lo]) / dt, 1) if dt > 0 else None
    return out


# ---- report ---------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    head = ["engine", "weights", "threads", "batch", "prefill tok/s", "decode tok/s", "weight MiB", "bw fraction"]
    lines = [head] + [[r["engine"], r["weights"], str(r.get("threads") or "-"), str(r["batch"]),
                       _fmt(r.get("prefill_tok_s")),
                       _fmt(r.get("decode_tok_s")), f"{r['weight_bytes'] / 2**20:,.1f}",
                       "-" if r.get("bw_fraction") is None else f"{r['bw_fraction']:.3f}"] for r in rows]
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(x, widths)))
                     for x in lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model preset with random weights (default tiny)")
    ap.add_argument("--shape", default=None, help="a published model's shape with random weights: 135m")
    ap.add_argument("--model", help="a checkpoint path instead of a preset (anything `jaxllama generate` loads)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bf16 elsewhere)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the engine sequence; figures are the best over rounds")
    ap.add_argument("--mesh", default=None, help="e.g. tensor=4 (default: one device)")
    ap.add_argument("--hf", default="torch", choices=("torch", "none"), help="time transformers too (CPU)")
    ap.add_argument("--hf-threads", default="1,all", help="torch thread counts to try; the best is kept (default 1,all)")
    ap.add_argument("--llamacpp", default="auto",
                    help="llama.cpp weight types: f32,q8_0,q4_0 | none | auto (all three when llama_cpp imports "
                         "and the device is a CPU)")
    ap.add_argument("--quant-batches", default="1", help="batches for quantized weights, ours and llama.cpp (default 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp and bandwidth threads")
    ap.add_argument("--llamacpp-threads", default=None,
                    help="llama.cpp thread counts to try, e.g. 1,2; the best is kept per figure (default: --threads; "
                         "with a neighbour busy on one of 2 cores, llama.cpp's 2 spinning threads run 6-9x slower "
                         "than 1)")
    ap.add_argument("--extra-bufts", default="auto", choices=("auto", "on", "off"),
                    help="llama.cpp's repacked CPU weight buffers (auto: off on AMX CPUs, where that path crashes)")
    ap.add_argument("--quantize", default="none", help="ours with these weight types too: none,int8,int4")
    ap.add_argument("--group-size", default=None,
                    help="--quantize group size: N for every mode, or per mode as int8:0,int4:32 (0: one scale per "
                         "output; default: the library's, as `jaxllama generate --quantize`)")
    ap.add_argument("--cli", default=None, help="also time `jaxllama generate` at these --max-new-tokens, e.g. 1,129")
    ap.add_argument("--cli-repeats", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the GGUF files and the CLI's params dir (default: a temp dir)")
    args = ap.parse_args()

    from jaxllama.infer.placement import parse_mesh, place_params

    quant_modes = [q for q in args.quantize.split(",") if q and q != "none"]
    for q in quant_modes:
        if q not in ("int8", "int4"):
            raise SystemExit(f"--quantize: {q!r} is not one of none, int8, int4")
    groups: dict[str, int] = {}
    for part in (args.group_size or "").split(","):
        if part:
            mode, _, n = part.rpartition(":")
            for q in ([mode] if mode else ["int8", "int4"]):
                groups[q] = int(n)
    m = None
    if args.model:
        from jaxllama.convert import load_model

        loaded = load_model(args.model)
        m = loaded.model_cfg
        a = inference_arch(Arch.from_config(m), args.dtype, scan_layers=False)
        layout = inference_program(a, parse_mesh(args.mesh) or {"data": 1, "fsdp": 1, "tensor": 1}).layout
        params = place_params(unstack_layers(loaded.params, a.n_layers), a, layout)
    else:
        shape = shape_overrides(args.shape) if args.shape else [f"model.preset={args.preset}"]
        m = load_config(None, [*shape, "data.seq_len=8"]).model
        a = inference_arch(Arch.from_config(m), args.dtype, scan_layers=False)  # as `jaxllama generate` runs
        layout = inference_program(a, parse_mesh(args.mesh) or {"data": 1, "fsdp": 1, "tensor": 1}).layout
        params = random_weights(a, layout)
    device = jax.devices()[0]
    kinds = args.llamacpp
    if kinds == "auto":
        try:
            import llama_cpp  # noqa: F401

            kinds = "f32,q8_0,q4_0" if device.platform == "cpu" and not args.model else "none"
        except ImportError:
            kinds = "none"
    lc_kinds = [k for k in kinds.split(",") if k and k != "none"]
    for k in lc_kinds:
        if k != "f32" and k not in LLAMA_QUANTS:
            raise SystemExit(f"--llamacpp: {k!r} is not one of f32, q8_0, q4_0, none, auto")
    if args.model and (lc_kinds or args.cli):
        raise SystemExit("--llamacpp/--cli with --model: export the model yourself; use --llamacpp none")
    work = Path(args.work or tempfile.mkdtemp(prefix="decode_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tok"
    bos = eos = None
    if lc_kinds or args.cli:
        bos, eos, special = make_tokenizer(tok_dir)
        if not args.model:  # so that `jaxllama generate` never stops early: BOS/EOS/UNK logits exactly 0
            emb = params["embed_tokens"]["embedding"]
            params["embed_tokens"]["embedding"] = emb.at[np.asarray(special)].set(0)

    engine = Engine(params, a, layout)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    # ---- the engines, each a (name, weights, batches, bytes, timer) ----
    engines: list[tuple[str, str, list[int], int, object]] = []
    batches = [int(x) for x in args.batches.split(",")]
    qbatches = [b for b in (int(x) for x in args.quant_batches.split(",")) if b in batches] or [1]
    engines.append(("jaxllama", a.param_dtype, batches, weight_bytes,
                    lambda p, new, rep, warm, e=engine: time_jax(e, p, new, rep, warm)))
    quant_groups: dict[str, int] = {}
    for q in quant_modes:
        qe, qbytes = quantized_engine(params, a, layout, q, groups.get(q))
        engines.append(("jaxllama", q, qbatches, qbytes, lambda p, new, rep, warm, e=qe: time_jax(e, p, new, rep, warm)))
        quant_groups[q] = qe.arch.quant_group
    lcs, lc_threads = [], []
    extra = {"auto": not has_amx(), "on": True, "off": False}[args.extra_bufts]
    if lc_kinds:
        from jaxllama.convert.common import Extras, ParamsSource
        from jaxllama.convert.gguf_format import write_gguf

        quiet_llama_cpp()
        f32 = work / "model-f32.gguf"
        src = ParamsSource(host_tree(params, a), m, Extras(tokenizer_dir=tok_dir, bos_token_id=bos, eos_token_id=eos))
        f32.unlink(missing_ok=True)  # the weights are made afresh each run
        write_gguf(src, f32, "f32")
        max_len = args.prompt_len + args.new_tokens + 8
        lc_threads = sorted({int(t) for t in (args.llamacpp_threads or str(args.threads)).split(",")})
        for k in lc_kinds:
            path = f32 if k == "f32" else quantize_gguf(f32, work / f"model-{k}.gguf", k, args.threads)
            lc = LlamaCpp(path, args.threads, extra, max_len)
            if lc.n_vocab != a.vocab_size:
                raise SystemExit(f"llama.cpp reads {lc.n_vocab} tokens from {path}, the model has {a.vocab_size}")
            lcs.append(lc)
            engines.append(("llama.cpp", k, batches if k == "f32" else qbatches, gguf_bytes(path),
                            lambda p, new, rep, warm, lc=lc: time_llamacpp(lc, p, new, rep, warm, lc_threads)))
    hf = None
    hf_threads: list[int] = []
    if args.hf == "torch":
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from jaxllama.convert.hf_names import hf_config_dict, to_hf_tensors

        hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(a))).eval()
        state = {k: torch.from_numpy(np.array(v, np.float32))
                 for k, v in to_hf_tensors(stack_layers(params, a.n_layers), a)}
        if a.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        hf.load_state_dict(state, strict=False)
        hf = hf.to(torch.bfloat16 if a.dtype == "bfloat16" else torch.float32)
        all_threads = torch.get_num_threads()
        hf_threads = sorted({all_threads if t == "all" else int(t) for t in args.hf_threads.split(",")})

        def hf_timer(p, new, rep, warm):
            # PyTorch's thread pool can lose badly on small ops when cores are shared: give transformers
            # its best of the thread counts, per figure.
            tries = []
            for threads in hf_threads:
                torch.set_num_threads(threads)
                tries.append(time_hf(hf, p, new, rep, warm))
            torch.set_num_threads(all_threads)
            return tries

        engines.append(("transformers", a.param_dtype, batches, weight_bytes, hf_timer))

    # Interleaved, so that noise hits every engine alike: ours, llama.cpp, transformers, ours int8, Q8_0, ...
    pair = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}
    order = []
    for e in [x for x in engines if x[0] == "jaxllama"]:
        order.append(e)
        order += [x for x in engines if x[0] == "llama.cpp" and x[1] == pair.get(e[1])]
        if e[1] == a.param_dtype:
            order += [x for x in engines if x[0] == "transformers"]
    engines = order + [x for x in engines if x not in order]

    if device.platform == "cpu":
        bandwidth, how = read_bandwidth(args.threads)
    else:
        bandwidth = next((v for k, v in HBM.items() if k in device.device_kind), None)
        bandwidth = bandwidth and bandwidth * layout.mesh.size
        how = "HBM peak"

    threads_of = {"transformers": hf_threads, "llama.cpp": lc_threads}
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(3, a.vocab_size, size=(b, args.prompt_len)).tolist() for b in batches}
    figures: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for b in batches:
            for name, wt, eb, _, timer in engines:
                if b not in eb:
                    continue
                start = time.perf_counter()
                t = timer(prompts[b], args.new_tokens, args.repeats, r == 0)
                tries = t if isinstance(t, list) else [t]
                got = [rates(b, args.prompt_len, args.new_tokens, *x) for x in tries]
                best = {k: max((g[k] for g in got if g[k] is not None), default=None) for k in got[0]}
                counts = threads_of.get(name)
                if counts and best["decode_tok_s"] is not None:  # the thread count of the best decode figure
                    best["threads"] = counts[[g["decode_tok_s"] for g in got].index(best["decode_tok_s"])]
                figures.setdefault((name, wt, b), []).append(best)
                print(f"  {name} {wt} batch {b}: decode {_fmt(best['decode_tok_s'])} tok/s, prefill "
                      f"{_fmt(best['prefill_tok_s'])} tok/s ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
        if args.rounds > 1:
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    if device.platform == "cpu":  # again after the timings: the better of the two (both recorded)
        bw_after, _ = read_bandwidth(args.threads)
        bw_both = [round(bandwidth / 1e9, 2), round(bw_after / 1e9, 2)]
        bandwidth = max(bandwidth, bw_after)
    if lcs and lc_kinds[0] == "f32":  # the same weights: llama.cpp f32 greedy agrees with ours token for token
        b = max(batches)
        ours_tok = np.array([c.tokens for c in engine.generate(prompts[b], 8, GREEDY)])
        same_tokens = float(np.mean(ours_tok == lcs[0].generate(np.asarray(prompts[b], np.int32), 8)))
    for lc in lcs:
        lc.close()

    record = {"bench": "decode_throughput", "model": args.model or args.shape or args.preset, "params": n_params,
              "dtype": a.dtype, "device": f"{device.platform}:{device.device_kind}", "n_devices": layout.mesh.size,
              "cpu_threads": os.cpu_count(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "rounds": args.rounds, "commit": _commit()}
    if bandwidth:
        record["read_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
        record["bandwidth_how"] = how
        if device.platform == "cpu":
            record["read_bandwidth_before_after_gb_s"] = bw_both
    if lc_kinds:
        if lcs and lc_kinds[0] == "f32":
            record["llamacpp_f32_same_greedy_tokens"] = round(same_tokens, 3)  # share of 8 tokens x max batch rows
        record["llamacpp_threads"] = lc_threads
        record["llamacpp_extra_bufts"] = extra
    if hf is not None:
        record["hf_threads"] = hf_threads
    if quant_groups:
        record["quant_group"] = quant_groups
    rows = []
    for name, wt, eb, nbytes, _ in engines:
        for b in eb:
            if (name, wt, b) not in figures:
                continue
            fs = figures[(name, wt, b)]
            med = {k: _best([f[k] for f in fs]) for k in ("prefill_tok_s", "decode_tok_s")}
            best_round = next((f for f in fs if f["decode_tok_s"] == med["decode_tok_s"]), fs[0])
            row = {"engine": name, "weights": wt, "batch": b, **med, "weight_bytes": nbytes,
                   "threads": best_round.get("threads")}
            if bandwidth and med["decode_tok_s"] is not None:
                row["bw_fraction"] = med["decode_tok_s"] / b * nbytes / bandwidth
            rows.append(row)
            key = {"jaxllama": "jaxllama", "llama.cpp": "llamacpp", "transformers": "hf"}[name]
            if not (name != "llama.cpp" and wt == a.param_dtype):
                key += f"_{wt}"
            entry = _round(med)
            entry["weight_mib"] = round(nbytes / 2**20, 1)
            if "threads" in best_round:
                entry["threads"] = best_round["threads"]
            if "bw_fraction" in row:
                entry["bw_fraction"] = round(row["bw_fraction"], 3)
            if args.rounds > 1:
                entry["decode_rounds"] = [None if f["decode_tok_s"] is None else round(f["decode_tok_s"], 1)
                                          for f in fs]
            record[f"{key}_b{b}"] = entry
    by = {(r["engine"], r["weights"], r["batch"]): r for r in rows}
    for b in batches:
        ours = by.get(("jaxllama", a.param_dtype, b))
        if ours is None:
            continue
        if ("transformers", a.param_dtype, b) in by:
            theirs = by[("transformers", a.param_dtype, b)]
            record[f"decode_ratio_b{b}"] = _ratio(ours["decode_tok_s"], theirs["decode_tok_s"])
            record[f"prefill_ratio_b{b}"] = _ratio(ours["prefill_tok_s"], theirs["prefill_tok_s"])
        for mine, peer in ((a.param_dtype, "f32"), ("int8", "q8_0"), ("int4", "q4_0")):
            if ("jaxllama", mine, b) in by and ("llama.cpp", peer, b) in by:
                x, y = by[("jaxllama", mine, b)], by[("llama.cpp", peer, b)]
                tag = "" if peer == "f32" else f"_{mine}_vs_{peer}"
                record[f"decode_ratio_llamacpp{tag}_b{b}"] = _ratio(x["decode_tok_s"], y["decode_tok_s"])
                record[f"prefill_ratio_llamacpp{tag}_b{b}"] = _ratio(x["prefill_tok_s"], y["prefill_tok_s"])
        if b == 1 and device.platform != "cpu" and ours.get("bw_fraction") is not None:
            record["bandwidth_fraction_b1"] = round(ours["bw_fraction"], 3)

    if args.cli:
        from jaxllama.convert.common import Extras, ParamsSource
        from jaxllama.convert.jaxllama_format import write_jaxllama

        if bos is None:
            bos, eos, _ = make_tokenizer(tok_dir)
        model_dir = work / "params"
        shutil.rmtree(model_dir, ignore_errors=True)
        if not model_dir.exists():
            write_jaxllama(ParamsSource(host_tree(params, a), m, Extras(tokenizer_dir=tok_dir, bos_token_id=bos,
                                                                         eos_token_id=eos)), model_dir)
        words = [w for line in _corpus_words() for w in line][: args.prompt_len // 2]
        record["cli"] = time_cli(model_dir, [int(x) for x in args.cli.split(",")], args.cli_repeats, words)

    print(json.dumps(record))
    print(table(rows), file=sys.stderr)
    for k, v in record.items():
        if "ratio" in k:
            print(f"{k}: {v}", file=sys.stderr)
    if bandwidth:
        print(f"bandwidth: {bandwidth / 1e9:.2f} GB/s ({how})", file=sys.stderr)
    if "cli" in record:
        print(f"jaxllama generate: {record['cli']}", file=sys.stderr)


def _corpus_words():
    rng = random.Random(0)
    syl = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    yield ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(256)]


def _commit() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it (others' work in progress)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True)
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def _best(xs: list):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


if __name__ == "__main__":
    main()
