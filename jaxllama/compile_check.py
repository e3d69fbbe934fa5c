"""``jaxllama compile-check``: lower and compile the real train step for N simulated devices.

A sharding mistake (a dimension that does not divide, a rule that replicates a 128k-vocabulary
head on every device, an unexpected all-gather of the whole model) shows up on a laptop instead of
on a pod. The step compiled here is the one training runs -- the program built by
:func:`jaxllama.program.build_program`, as ``jaxllama train`` builds it -- but its inputs are
abstract (``jax.ShapeDtypeStruct`` with shardings): nothing is allocated, so llama3-8b on 16 devices
compiles on a 2-core CPU.

XLA can only simulate N host devices if ``--xla_force_host_platform_device_count=N`` is set before
JAX initializes, so :func:`compile_check` re-runs itself in a fresh Python process
(``python -m jaxllama.compile_check``) unless the current process already has exactly N CPU devices.

What is compiled for the CPU differs from an accelerator in two documented ways: ``model.dtype:
auto`` is compiled as bfloat16 (what GPUs and TPUs run) and attention as the ``xla`` reference
kernel (cuDNN and splash kernels do not exist on CPU), whose float32 ``[seq, seq]`` scores appear in
the temporary memory where a flash kernel would need none.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import jax

from jaxllama.config import Config, load_config
from jaxllama.errors import ConfigError, JaxllamaError, RunError
from jaxllama.model.llama import Arch
from jaxllama.plan import target_arch
from jaxllama.program import build_program

GIB = 1024**3
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclass
class CompileReport:
    """XLA's memory analysis of the compiled step, per device, plus what it took to get there."""

    preset: str
    devices: int
    mesh: dict
    dtype: str
    attention: str
    n_layers: int
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int  # arguments + outputs - aliased (donated) + temporaries
    collectives: dict
    notes: list


def cpu_arch(cfg: Config) -> tuple[Arch, list[str]]:
    """The architecture compiled on CPU: the accelerator's (:func:`jaxllama.plan.target_arch`: bfloat16
    for ``auto``), with the ``xla`` attention kernel (flash kernels do not exist on CPU)."""
    arch = target_arch(cfg)
    notes = ["model.dtype auto compiled as bfloat16 (the accelerator default)"] if cfg.model.dtype == "auto" else []
    if arch.attention != "xla":
        notes.append(f"attention compiled with the xla reference kernel (configured: {cfg.model.attention}); "
                     "its float32 [seq, seq] scores count in temp, which flash kernels avoid")
    return dataclasses.replace(arch, attention="xla"), notes


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the optimized (partitioned) HLO contains."""
    counts = {}
    for op in COLLECTIVES:
        n = len(re.findall(rf"= [^=\n]*? {op}(?:-start)?\(", hlo_text))
        if n:
            counts[op] = n
    return counts


def compile_train_step(cfg: Config, devices: list | None = None) -> CompileReport:
    """Lower + compile the train step for ``cfg`` on ``devices`` (default: all) with abstract inputs."""
    arch, notes = cpu_arch(cfg) if jax.default_backend() == "cpu" else (None, [])
    program = build_program(cfg, devices, arch)
    arch, mesh = program.arch, program.mesh
    state, batch = program.abstract_inputs()
    start = time.perf_counter()
    try:
        compiled = program.train_step.lower(state, batch).compile()
    except Exception as e:  # XLA reports sharding/shape problems as assorted exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"compiling the train step failed: {first}") from e
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    return CompileReport(
        preset=cfg.model.preset, devices=mesh.size, mesh=dict(mesh.shape), dtype=arch.dtype,
        attention=arch.attention, n_layers=arch.n_layers, compile_s=seconds, argument_bytes=arg,
        output_bytes=out, alias_bytes=alias, temp_bytes=temp,
        code_bytes=int(mem.generated_code_size_in_bytes), peak_bytes=arg + out - alias + temp,
        collectives=count_collectives(compiled.as_text()), notes=notes)


def compile_check(config: str | None, overrides: list[str], devices: int, timeout_s: float = 3600) -> CompileReport:
    """Validate the config for ``devices``, then compile in a process with that many CPU devices.

    Runs in this process when it already has exactly ``devices`` CPU devices (the tests); otherwise
    re-executes ``python -m jaxllama.compile_check`` with the device count set before JAX starts.
    """
    cfg = load_config(config, overrides)
    build_program(cfg, devices)  # abstract: the mesh and shard checks fail fast, before a process start
    if _simulating(devices) and jax.device_count() == devices:
        return compile_train_step(cfg)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=f"{_strip_device_count(os.environ.get('XLA_FLAGS', ''))} "
                         f"--xla_force_host_platform_device_count={devices}".strip())
    cmd = [sys.executable, "-m", "jaxllama.compile_check", "--devices", str(devices)]
    cmd += (["--config", str(config)] if config else []) + ["--", *overrides]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RunError(f"compile-check: compiling for {devices} devices took over {timeout_s:.0f}s") from None
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunError(f"compile-check: the compiling process exited {proc.returncode}: {tail}") from None
    if "error" in result:
        raise (ConfigError if result["exit_code"] == 2 else RunError)(result["error"])
    return CompileReport(**result)


def _simulating(devices: int) -> bool:
    """True when this process is set up (by environment) as ``devices`` CPU devices. Decided without
    starting a JAX backend, which on a GPU host would claim most of the GPU memory for nothing."""
    flags = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return os.environ.get("JAX_PLATFORMS") == "cpu" and bool(flags) and int(flags[-1]) == devices


def _strip_device_count(flags: str) -> str:
    return re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags).strip()


def format_report(r: CompileReport) -> str:
    """The lines ``jaxllama compile-check`` prints."""
    def g(n: int) -> str:  # GiB, or MiB for small models
        return f"{n / GIB:9.3f} GiB" if n >= GIB / 10 or n == 0 else f"{n / 2**20:9.3f} MiB"

    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
    coll = ", ".join(f"{k} {v}" for k, v in r.collectives.items()) or "none"
    lines = [f"compiled the train step of {r.preset} ({r.n_layers} layers, {r.dtype}, attention {r.attention}) "
             f"for {r.devices} devices, mesh {mesh}, in {r.compile_s:.1f}s",
             "XLA memory analysis, per device:",
             f"  arguments      {g(r.argument_bytes)}   (train state + batch shards)",
             f"  outputs        {g(r.output_bytes)}",
             f"  aliased        {g(r.alias_bytes)}   (donated state reused for the new state)",
             f"  temporaries    {g(r.temp_bytes)}   (activations, gradients, gathered weights)",
             f"  generated code {g(r.code_bytes)}",
             f"  peak           {g(r.peak_bytes)}   (arguments + outputs - aliased + temporaries)",
             f"collectives:     {coll}"]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _child(argv: list[str]) -> int:
    """Entry of the re-executed process: compile, print the report as one JSON line."""
    import argparse

    p = argparse.ArgumentParser(prog="jaxllama.compile_check")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        if jax.device_count() != args.devices:
            raise RunError(f"compile-check: asked for {args.devices} simulated devices, JAX has {jax.device_count()}")
        report = compile_train_step(load_config(args.config, args.overrides))
        print(json.dumps(asdict(report)))
    except JaxllamaError as e:
        print(json.dumps(dict(error=str(e), exit_code=e.exit_code)))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
