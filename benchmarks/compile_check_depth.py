"""Compile time of `jaxllama compile-check` vs model depth: scan keeps it flat.

Peer: the same configuration with 2 layers instead of the preset's depth, compiled in the same run
(each in its own process with N simulated CPU devices, as the CLI does). Prints one JSON line.

    python benchmarks/compile_check_depth.py --preset llama3-8b --devices 16 --fsdp 8 --tensor 2
"""

from __future__ import annotations

import argparse
import json
import time

from jaxllama.compile_check import compile_check
from jaxllama.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--tensor", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shallow", type=int, default=2, help="layers of the peer")
    args = p.parse_args()
    base = [f"model.preset={args.preset}", "model.dtype=bfloat16", "model.remat=save_dots", "mesh.data=1",
            f"mesh.fsdp={args.fsdp}", f"mesh.tensor={args.tensor}", f"data.seq_len={args.seq_len}",
            f"data.global_batch={args.batch}"]
    depth = load_config(None, base).model.n_layers
    result = dict(preset=args.preset, devices=args.devices)
    for name, extra in (("shallow", [f"model.n_layers={args.shallow}"]), ("full", [])):
        start = time.perf_counter()
        report = compile_check(None, base + extra, args.devices)
        result[name] = dict(layers=report.n_layers, compile_s=round(report.compile_s, 2),
                            wall_s=round(time.perf_counter() - start, 2), temp_gib=round(report.temp_bytes / 2**30, 3))
    result["layers_ratio"] = depth / args.shallow
    result["compile_ratio"] = round(result["full"]["compile_s"] / result["shallow"]["compile_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
