"""Input-pipeline tokens/s per process, per tokenizer kind and packing mode; and does real data slow training?

Part 1 (always): the stdlib corpus through the real pipeline (`make_source`: tf.data read + shuffle +
tokenize, Python packer, prefetch thread) for each tokenizer kind (SentencePiece, Llama 3 tiktoken,
Hugging Face tokenizer.json) and packing mode (pack, concat). The peer, in the same run, is a plain
single-threaded Python loop doing the same work (read, ``encode_batch``, the same packer): the ratio says
what tf.data's parallel tokenizing buys. Tokens are row slots (``batch x seq_len``); ``real_tokens_per_s``
counts only non-padding tokens. One JSON line per (tokenizer, packing).

Part 2 (``--train-steps N``): the demo's step time (``jaxllama train`` defaults: tiny model, stdlib text)
against the same run on synthetic tokens, alternated, median step time of each; the issue asks that real
data stay within 5% of synthetic. One JSON line.

    python benchmarks/data_throughput.py [--batches 40] [--seq-len 2048] [--batch 8] [--train-steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def tokenizers(folder: str, vocab: int) -> dict[str, str]:
    """One tokenizer of each kind, all trained on the stdlib corpus with about ``vocab`` pieces."""
    from tokenize_throughput import hf_folder, llama3_style_tiktoken, stdlib_docs

    from jaxllama.data.tokenizers import cached_stdlib_tokenizer

    tiktoken = llama3_style_tiktoken(stdlib_docs(600), vocab, folder)
    os.makedirs(os.path.join(folder, "hf"))
    hf = hf_folder(tiktoken, os.path.join(folder, "hf"))
    return {"sentencepiece": cached_stdlib_tokenizer(vocab), "tiktoken": tiktoken, "hf": hf}


def pipeline_rate(cfg, batches: int) -> tuple[float, float]:
    """(slot tokens/s, packing efficiency) of ``batches`` batches after the first (start-up excluded)."""
    from jaxllama.data.sources import make_source

    src = make_source(cfg)
    try:
        next(src)
        start = time.perf_counter()
        for _ in range(batches):
            next(src)
        elapsed = time.perf_counter() - start
        return batches * cfg.data.global_batch * cfg.data.seq_len / elapsed, src.efficiency
    finally:
        src.close()


def python_loop_rate(cfg, tokenizer_path: str, batches: int) -> float:
    """The peer: the same documents, tokenizer and packer in one plain Python loop (no tf.data, no thread)."""
    from jaxllama.data.corpus import iter_documents
    from jaxllama.data.packing import Packer
    from jaxllama.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    d = cfg.data
    packer = Packer(d.seq_len, d.packing, pad_id=tok.pad_id)
    docs, got = iter_documents("stdlib"), 0
    start = None
    while got <= batches:
        chunk = [next(docs) for _ in range(64)]
        for ids in tok.encode_batch(chunk):
            packer.add(ids)
        while len(packer.ready) >= d.global_batch:
            packer.pop(d.global_batch)
            got += 1
            if got == 1:
                start = time.perf_counter()  # the first batch is start-up, as for the pipeline
    return batches * d.global_batch * d.seq_len / (time.perf_counter() - start)


def train_step_times(overrides: list[str], steps: int) -> float:
    """Median step time (s) of a demo run, excluding the first logged window (compilation)."""
    from jaxllama.config import load_config
    from jaxllama.train.loop import train

    with tempfile.TemporaryDirectory() as run:
        cfg = load_config(None, [f"train.steps={steps}", "train.log_every=5", "checkpoint.enabled=false",
                                 "train.tensorboard=false", "train.progress=false", f"run_dir={run}", *overrides])
        history = train(cfg, out=lambda _: None)["history"]
    return statistics.median(r["step_time_s"] for r in history[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="rows per batch (one process)")
    ap.add_argument("--vocab", type=int, default=8000, help="tokenizer pieces")
    ap.add_argument("--train-steps", type=int, default=0, help="also compare demo step time, real vs synthetic")
    ap.add_argument("--rounds", type=int, default=2, help="alternated train runs of each kind")
    args = ap.parse_args()

    from jaxllama.config import load_config

    with tempfile.TemporaryDirectory() as folder:
        for kind, path in tokenizers(folder, args.vocab).items():
            for packing in ("pack", "concat"):
                cfg = load_config(None, ["data.source=stdlib", f"data.tokenizer={path}", f"data.packing={packing}",
                                         f"data.seq_len={args.seq_len}", f"data.global_batch={args.batch}",
                                         "model.vocab_size=16384", "model.max_position=8192"])
                rate, eff = pipeline_rate(cfg, args.batches)
                peer = python_loop_rate(cfg, path, args.batches)
                print(json.dumps({"tokenizer": kind, "packing": packing, "tokens_per_s": round(rate),
                                  "real_tokens_per_s": round(rate * eff), "packing_efficiency": round(eff, 4),
                                  "python_loop_tokens_per_s": round(peer), "vs_python_loop": round(rate / peer, 2),
                                  "seq_len": args.seq_len, "batch": args.batch, "cpus": os.cpu_count()}), flush=True)
    if args.train_steps:
        real, synthetic = [], []
        for _ in range(args.rounds):  # alternate, so drift in the machine's load hits both alike
            real.append(train_step_times(["data.source=stdlib"], args.train_steps))
            synthetic.append(train_step_times(["data.source=synthetic"], args.train_steps))
        r, s = statistics.median(real), statistics.median(synthetic)
        print(json.dumps({"demo_step_time_s": {"stdlib": round(r, 4), "synthetic": round(s, 4)},
                          "stdlib_over_synthetic": round(r / s, 3), "runs": args.rounds,
                          "steps": args.train_steps}), flush=True)


if __name__ == "__main__":
    main()
