"""Peak host memory of ``jaxllama convert`` in each direction, against transformers' load+save as the peer.

Builds a random Llama of about 1.35 GB (float32) as a Hugging Face folder -- streamed, so building
it needs little memory -- then runs each conversion as its own process and records its maximum
resident set size (as ``/usr/bin/time -v`` reports it) and its peak
anonymous memory (sampled from /proc/PID/status; file-backed pages of memory-mapped inputs are
reclaimable and excluded there). The peer, measured in the same run, is
``AutoModelForCausalLM.from_pretrained(...).save_pretrained(...)`` on the same folder.

    python benchmarks/convert_memory.py --out-dir /tmp/convmem

Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jaxllama.convert.common import Extras, Source, expected_shape, model_config
from jaxllama.convert.hf import write_hf

MIB = 2**20


class RandomSource(Source):
    """Random tensors generated on demand, so a large test model never has to sit in memory."""

    def __init__(self, m):
        self.model_cfg, self.extras, self.dtype, self.path = m, Extras(), None, Path("random")

    def _read(self, name, layer):
        rng = np.random.default_rng(abs(hash((name, layer))) % 2**32)
        shape = expected_shape(self.model_cfg, name)
        if name.endswith("scale"):
            return np.ones(shape, np.float32)
        return (rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])).astype(np.float32)


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``: wall time, its maximum RSS, and peak RssAnon (polled, 20 ms)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = [0]

    def poll():  # RssAnon of the measured process (time's child)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        while proc.poll() is None:
            try:
                pid = children.read_text().split()[0]
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
            time.sleep(0.02)

    th = threading.Thread(target=poll)
    th.start()
    err = proc.stderr.read().decode()
    proc.wait()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-25:]}")
    max_rss = int(next(line for line in err.splitlines() if "Maximum resident set size" in line).split()[-1])
    return {"wall_s": round(time.perf_counter() - t0, 1), "max_rss_mib": round(max_rss * 1024 / MIB),
            "peak_anon_mib": round(peak_anon[0] / MIB)}


def largest_file(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return max(p.stat().st_size for p in files)


PEER = """
import sys, torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).save_pretrained(sys.argv[2], max_shard_size="1GB")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="/tmp/jaxllama-convert-memory")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    m = model_config(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128,
                     n_kv_heads=args.dim // 512, ffn_dim=args.ffn, norm_eps=1e-5, rope_theta=10000.0)
    write_hf(RandomSource(m), out / "hf", shard_size=10**9)
    model_bytes = sum(p.stat().st_size for p in (out / "hf").glob("*.safetensors"))
    largest_tensor = max(int(np.prod(expected_shape(m, n))) * 4 for n, _ in RandomSource(m).names())
    cli = [sys.executable, "-m", "jaxllama.cli", "convert"]
    rows = []
    peer = measure([sys.executable, "-c", PEER, str(out / "hf"), str(out / "peer")])
    rows.append(("hf -> hf (peer: transformers load + save_pretrained)", peer, largest_file(out / "peer")))
    shutil.rmtree(out / "peer")
    steps = [("hf", "gguf", "m.gguf", []), ("gguf", "hf", "hf-from-gguf", ["--shard-size", "1GB"]),
             ("hf", "meta", "meta", ["--shards", "2"]), ("meta", "hf", "hf-from-meta", ["--shard-size", "1GB"]),
             ("hf", "jaxllama", "jx", []), ("jaxllama", "hf", "hf-from-jx", ["--shard-size", "1GB"])]
    paths = {"hf": out / "hf"}
    for src, to, name, extra in steps:
        dst = out / name
        r = measure([*cli, str(paths[src]), str(dst), "--to", to, *extra])
        rows.append((f"{src} -> {to}", r, largest_file(dst)))
        if to != "hf":
            paths[to] = dst
        else:
            shutil.rmtree(dst)
    print(f"model: {model_bytes / MIB:,.0f} MiB float32 ({sum(1 for _ in RandomSource(m).names())} tensors, "
          f"largest {largest_tensor / MIB:,.0f} MiB); peer max RSS {peer['max_rss_mib']:,} MiB\n")
    print("| direction | wall s | max RSS MiB | peak anon MiB | largest output file MiB | max RSS / peer |")
    print("|---|---|---|---|---|---|")
    for label, r, big in rows:
        print(f"| {label} | {r['wall_s']} | {r['max_rss_mib']:,} | {r['peak_anon_mib']:,} | {big / MIB:,.0f} | "
              f"{r['max_rss_mib'] / peer['max_rss_mib']:.2f}x |")
    print(json.dumps({"model_mib": round(model_bytes / MIB), "rows": [
        {"direction": label, **r, "largest_output_mib": round(big / MIB)} for label, r, big in rows]}))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
