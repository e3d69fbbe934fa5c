"""Per-chip figures of a compiled step: the compiler's memory and cost analysis, and the roofline.

The roofline time of a step is max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth): no schedule of
that program on that chip can be faster, so ``model FLOPs / (peak x roofline time)`` bounds the MFU
it can reach (collectives, which overlap or not, come on top). FLOPs and bytes are per chip
(the partitioned program each chip runs); model FLOPs follow ARCHITECTURE.md's formula.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclass(frozen=True)
class StepStats:
    """One compiled step, per chip: XLA's memory analysis, collectives, cost."""

    name: str
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int  # arguments + outputs - aliased (donated) + temporaries
    collectives: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # custom calls by target (tpu_custom_call: Pallas/Mosaic kernels)
    flops: float = 0.0  # the compiler's cost analysis (0: not asked for)
    bytes_accessed: float = 0.0
    model_flops: float = 0.0  # ARCHITECTURE.md's count for the step's tokens, per chip
    tokens: int = 0  # per step, the whole mesh
    error: str = ""  # set when the compiler refused the step for want of memory (nothing else is known)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the optimized (partitioned) HLO contains."""
    counts = {}
    for op in COLLECTIVES:
        n = len(re.findall(rf"= [^=\n]*? {op}(?:-start)?\(", hlo_text))
        if n:
            counts[op] = n
    return counts


def count_kernels(hlo_text: str) -> dict[str, int]:
    """Custom calls in the optimized HLO by target: hand-written kernels (splash is ``tpu_custom_call``,
    cuDNN attention ``__cudnn$fmha...``) that the compiler did not generate itself."""
    counts: dict[str, int] = {}
    for name in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
        counts[name] = counts.get(name, 0) + 1
    return counts


def step_stats(name: str, compiled: Any, seconds: float, model_flops: float = 0.0, tokens: int = 0) -> StepStats:
    mem = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    hlo = compiled.as_text()
    return StepStats(name, seconds, arg, out, alias, temp, int(mem.generated_code_size_in_bytes),
                     arg + out - alias + temp, count_collectives(hlo), count_kernels(hlo), model_flops=model_flops,
                     tokens=tokens)


def roofline(s: StepStats, chip: dict) -> dict:
    """Seconds per step at the roofline, which bound sets it, and the MFU bound."""
    compute = s.flops / chip["peak_flops"]
    memory = s.bytes_accessed / chip["hbm_bandwidth"]
    seconds = max(compute, memory)
    mfu = s.model_flops / (chip["peak_flops"] * seconds) if seconds else 0.0
    return dict(seconds=seconds, compute_s=compute, memory_s=memory,
                bound="compute" if compute >= memory else "HBM bandwidth", mfu_bound=mfu)


def _size(n: float) -> str:
    return f"{n / GIB:9.3f} GiB" if n >= GIB / 10 or n == 0 else f"{n / 2**20:9.3f} MiB"


def format_step(s: StepStats, chip: dict | None) -> list[str]:
    if s.error:
        return [f"{s.name}: DOES NOT FIT ({s.error})"]
    coll = ", ".join(f"{k} {v}" for k, v in s.collectives.items()) or "none"
    lines = [f"{s.name}: compiled in {s.compile_s:.1f}s; per chip:",
             f"  arguments      {_size(s.argument_bytes)}   (state / params + inputs)",
             f"  outputs        {_size(s.output_bytes)}",
             f"  aliased        {_size(s.alias_bytes)}   (donated inputs reused for outputs)",
             f"  temporaries    {_size(s.temp_bytes)}   (activations, gradients, gathered weights, cache)",
             f"  generated code {_size(s.code_bytes)}",
             f"  peak           {_size(s.peak_bytes)}   (arguments + outputs - aliased + temporaries)"]
    if chip:
        hbm = chip["hbm_bytes"]
        verdict = "FITS" if s.peak_bytes <= hbm else "DOES NOT FIT"
        lines.append(f"  HBM            {_size(hbm)}   {verdict} ({100 * s.peak_bytes / hbm:.0f}% of {chip['name']} HBM)")
    lines.append(f"  collectives    {coll}")
    if s.kernels:
        lines.append("  kernels        " + ", ".join(f"{k} {v}" for k, v in sorted(s.kernels.items())))
    if s.flops or s.bytes_accessed:
        lines.append(f"  cost           {s.flops:.4g} FLOPs, {s.bytes_accessed:.4g} HBM bytes per step "
                     f"(model FLOPs {s.model_flops:.4g})")
    if chip and (s.flops or s.bytes_accessed):
        r = roofline(s, chip)
        lines.append(f"  roofline       {1e3 * r['seconds']:.3f} ms per step ({r['bound']}-bound: compute "
                     f"{1e3 * r['compute_s']:.3f} ms, HBM {1e3 * r['memory_s']:.3f} ms) -> "
                     f"{s.tokens / r['seconds']:,.0f} tokens/s at most; MFU <= {100 * r['mfu_bound']:.1f}%")
        if s.model_flops > s.flops:  # the compiler counted less than the model does: loops it counted once
            lines.append("  (the cost analysis counts fewer FLOPs than the model has: a loop in this step is "
                         "counted once, so the bound is loose)")
    return lines


def format_report(r: Any) -> str:
    """The lines ``jaxllama compile-check`` prints (``r``: a :class:`jaxllama.compile_check.CompileReport`)."""
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
    where = (f"{r.slices} x {r.target} ({r.devices} chips, TPU compiler)" if r.target and r.slices > 1 else
             f"{r.target} ({r.devices} chips, TPU compiler)" if r.target else f"{r.devices} devices")
    lines = [f"compile-check of {r.preset} ({r.n_layers} layers, {r.dtype}, attention {r.attention}) for {where}, "
             f"mesh {mesh}"]
    if r.chip:
        c = r.chip
        lines.append(f"chip: {c['name']}: {c['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {c['hbm_bytes'] / GIB:.0f} GiB HBM "
                     f"at {c['hbm_bandwidth'] / 1e9:.0f} GB/s")
    for s in r.steps:
        lines += format_step(s, r.chip)
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
