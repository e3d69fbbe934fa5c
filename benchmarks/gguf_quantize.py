"""Quantized GGUF export (issue 16): our encoders against llama.cpp's quantizer, quality and speed.

Quality (``--part quality``), on the tests' trained fixture model (``tests/trained_model.py``: the tiny
preset with ffn 768 trained 100 steps on the stdlib corpus; trained into ``--work`` unless already
there): for each kind, our export (``jaxllama convert RUN --to gguf --gguf-type KIND``) and llama.cpp's
``llama_model_quantize`` of our f32 export to the same kind (q4_k: ``--pure`` Q4_K_S), each run by
llama.cpp on textwrap.py of the stdlib (8 windows of 128 tokens): perplexity, mean KL divergence of
the next-token distributions from the f32 file's, and for the Q4_K/Q6_K tensors the RMS weight error
(dequantized with ``gguf.quants``) and the fraction of 256-value blocks bit-identical to llama.cpp's.

Speed (``--part speed``), on the 135M shape (dim 576, 30 layers, 9/3 heads, ffn 1536, vocab 49152,
tied) with random weights: seconds of ``write_gguf`` for each kind from parameters in memory (the
tensor stream of ``jaxllama convert``; f32 is the cost of writing alone), and of llama.cpp's
``llama_model_quantize`` from the f32 GGUF with 2 threads and with 1. Rows of 576 are not whole
256-blocks, so in this shape K-quant kinds write most matrices as their fallback (Q5_0 for Q4_K,
Q8_0 for Q6_K), as llama.cpp does; only ffn_down (rows of 1536) is a K-quant. One JSON line per row.

    python benchmarks/gguf_quantize.py --work /tmp/gguf_quantize            # both parts
    python benchmarks/gguf_quantize.py --work /tmp/gguf_quantize --part speed --kinds q8_0,q4_k_m
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
KINDS = ["q8_0", "q4_0", "q4_k", "q6_k", "q4_k_m"]


def block_stats(f32_path: Path, ours_path: Path, theirs_path: Path) -> dict:
    """Per K-quant type in ``theirs_path``: RMS error of ours and theirs, and the bit-identical block fraction."""
    import gguf

    f32 = {t.name: np.array(t.data) for t in gguf.GGUFReader(f32_path).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
    acc: dict = {}
    for t in gguf.GGUFReader(theirs_path).tensors:
        if t.tensor_type.name not in ("Q4_K", "Q6_K") or ours[t.name].tensor_type != t.tensor_type:
            continue
        x, q = f32[t.name], t.tensor_type
        block = gguf.GGML_QUANT_SIZES[q][1]
        a, b = np.array(ours[t.name].data), np.array(t.data)
        s = acc.setdefault(q.name, dict(same=0, blocks=0, err_ours=0.0, err_llamacpp=0.0, n=0))
        s["same"] += int((a.reshape(-1, block) == b.reshape(-1, block)).all(1).sum())
        s["blocks"] += a.size // block
        s["err_ours"] += float(((gguf.quants.dequantize(a, q).reshape(x.shape) - x) ** 2).sum())
        s["err_llamacpp"] += float(((gguf.quants.dequantize(b, q).reshape(x.shape) - x) ** 2).sum())
        s["n"] += x.size
    return {k: dict(identical_blocks=round(s["same"] / s["blocks"], 4), blocks=s["blocks"],
                    rms_ours=float(np.sqrt(s["err_ours"] / s["n"])),
                    rms_llamacpp=float(np.sqrt(s["err_llamacpp"] / s["n"])),
                    rms_ratio=round(float(np.sqrt(s["err_ours"] / s["err_llamacpp"])), 5)) for k, s in acc.items()}


def quality(work: Path, kinds: list[str]) -> None:
    from jaxllama.cli import main
    from test_gguf_quants import llama_quantize, run_llama_cpp
    from trained_model import train_tiny

    t0 = time.perf_counter()
    run = train_tiny(work / "trained")
    print(json.dumps({"part": "quality", "model": str(run), "train_or_reuse_s": round(time.perf_counter() - t0, 1)}))
    text = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    d = work / "quality"
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in ["f32", *kinds]:
        files[kind] = d / f"{kind}.gguf"
        files[kind].unlink(missing_ok=True)
        assert main(["convert", str(run), str(files[kind]), "--to", "gguf", "--gguf-type", kind]) == 0
        if kind != "f32":
            files["llama.cpp " + kind] = d / f"llama-cpp-{kind}.gguf"
            llama_quantize(files["f32"], files["llama.cpp " + kind], kind)
    ref, targets, greedy32 = run_llama_cpp(files["f32"], text)
    for key, path in files.items():
        logp, _, greedy = run_llama_cpp(path, text)
        row = dict(part="quality", file=key, bytes=path.stat().st_size,
                   ppl=round(float(np.exp(-logp[np.arange(len(targets)), targets].mean())), 3),
                   kl_vs_f32=float((np.exp(ref) * (ref - logp)).sum(1).mean()),
                   greedy_equal_f32=int(np.cumprod(np.array(greedy) == np.array(greedy32)).sum()))
        if key in kinds and key not in ("q8_0", "q4_0"):
            row["k_quant_blocks"] = block_stats(files["f32"], path, files["llama.cpp " + key])
        print(json.dumps(row), flush=True)


def speed(work: Path, kinds: list[str]) -> None:
    import llama_cpp
    from helpers import random_params
    from jaxllama.config import load_config
    from jaxllama.convert.common import ParamsSource
    from jaxllama.convert.gguf_format import write_gguf
    from jaxllama.model.llama import Arch
    from dpo_throughput import SHAPE  # noqa: E402 (the 135M shape's overrides)

    m = load_config(None, [*SHAPE, "data.seq_len=32"]).model
    params = random_params(Arch.from_config(m), seed=0)
    d = work / "speed"
    d.mkdir(parents=True, exist_ok=True)
    for kind in ["f32", *kinds]:
        out = d / f"{kind}.gguf"
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        write_gguf(ParamsSource(params, m), out, kind)
        row = dict(part="speed", shape="135m", engine="jaxllama write_gguf", kind=kind,
                   seconds=round(time.perf_counter() - t, 2), bytes=out.stat().st_size)
        print(json.dumps(row), flush=True)
    import ctypes

    from test_gguf_quants import LLAMA_FTYPE

    for kind in kinds:
        for threads in (2, 1):
            name, pure = LLAMA_FTYPE[kind]
            q = llama_cpp.llama_model_quantize_default_params()
            q.ftype, q.nthread, q.pure = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}"), threads, pure
            out = d / f"llama-cpp-{kind}.gguf"
            out.unlink(missing_ok=True)
            t = time.perf_counter()
            assert llama_cpp.llama_model_quantize(str(d / "f32.gguf").encode(), str(out).encode(), ctypes.byref(q)) == 0
            print(json.dumps(dict(part="speed", shape="135m", engine=f"llama.cpp quantize, {threads} threads",
                                  kind=kind, seconds=round(time.perf_counter() - t, 2), bytes=out.stat().st_size)),
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_quantize"))
    ap.add_argument("--part", choices=("quality", "speed", "both"), default="both")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated --gguf-type values (default {KINDS})")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    from decode_throughput import quiet_llama_cpp

    quiet_llama_cpp()
    if args.part in ("quality", "both"):
        quality(args.work, kinds)
    if args.part in ("speed", "both"):
        speed(args.work, kinds)


if __name__ == "__main__":
    main()
