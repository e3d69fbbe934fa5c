"""``jaxllama compile-check``: lower and compile the real steps for a TPU slice or N simulated devices.

A sharding mistake (a dimension that does not divide, a rule that replicates a 128k-vocabulary
head on every device, an unexpected all-gather of the whole model), a kernel that rejects a shape,
or a step that does not fit in HBM shows up on a laptop instead of on a pod. The steps compiled
here are the ones training and ``generate`` run -- the program built by
:func:`jaxllama.program.build_program` -- with abstract inputs (``jax.ShapeDtypeStruct`` with
shardings): nothing is allocated, so llama3-8b on a v5p-64 compiles on a 2-core CPU.

``--target v5p-64`` compiles with the real TPU compiler (the ``libtpu`` wheel: ``pip install -e
'.[tpu]'``) for that slice's devices (:func:`jaxllama.parallel.chips.target_devices`), with the
real kernels (splash attention as a Mosaic kernel). ``--devices N`` compiles for N simulated CPU
devices instead; there ``model.dtype: auto`` is compiled as bfloat16 and attention as the ``xla``
reference kernel (cuDNN and splash do not exist on CPU), whose float32 ``[seq, seq]`` scores count
in the temporaries where a flash kernel needs none.

Both need settings fixed before JAX starts (the simulated device count; the TPU environment), so
:func:`compile_check` re-runs itself in a fresh process (``python -m jaxllama.compile_check``) that
prints the report as one JSON line. The cost and roofline figures are in :mod:`jaxllama.roofline`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import jax

from jaxllama.config import Config
from jaxllama.train.init_from import load_train_config
from jaxllama.errors import ConfigError, JaxllamaError, RunError
from jaxllama.model.llama import Arch
from jaxllama.parallel.chips import TpuTarget, check_libtpu, target_devices
from jaxllama.plan import flops_per_token, matmul_params, target_arch
from jaxllama.program import build_program
from jaxllama.roofline import StepStats, count_collectives, format_report, step_stats  # noqa: F401 (re-exported)


@dataclass
class CompileReport:
    """What was compiled, for what, and each step's per-chip figures (the train step first)."""

    preset: str
    devices: int
    mesh: dict
    dtype: str
    attention: str
    n_layers: int
    steps: list  # StepStats (dicts once sent through JSON; see from_json)
    target: str | None = None
    chip: dict | None = None  # name, peak_flops, hbm_bytes, hbm_bandwidth
    slices: int = 1
    notes: list = field(default_factory=list)

    @property
    def train(self) -> StepStats:
        return self.steps[0]

    @classmethod
    def from_json(cls, d: dict) -> "CompileReport":
        return cls(**dict(d, steps=[StepStats(**s) for s in d["steps"]]))


@dataclass(frozen=True)
class GenerateShape:
    """The batch ``--generate`` compiles: rows, prompt tokens, and new tokens (cache = prompt + new)."""

    batch: int = 0  # 0: one row per batch shard
    prompt_len: int = 1024
    max_new: int = 256


def compile_arch(cfg: Config, platform: str) -> tuple[Arch, list[str]]:
    """The architecture compiled for ``platform`` (``tpu`` or ``cpu``): ``auto`` dtype is bfloat16;
    ``auto`` attention is splash on TPU and, on CPU, the native ``cpu_flash``; other kernels become the
    ``xla`` reference on CPU."""
    arch = target_arch(cfg)
    notes = ["model.dtype auto compiled as bfloat16 (the accelerator default)"] if cfg.model.dtype == "auto" else []
    if platform == "tpu":
        attention = "splash" if cfg.model.attention == "auto" else cfg.model.attention
        if attention not in ("splash", "xla", "dot_product"):
            raise ConfigError(f"model.attention={attention}: not a TPU kernel (use auto, splash, xla or dot_product)")
        return dataclasses.replace(arch, attention=attention), notes
    if arch.attention == "cpu_flash":  # CPU's own kernel (auto on CPU)
        return arch, notes
    if arch.attention != "xla":
        notes.append(f"attention compiled with the xla reference kernel (configured: {cfg.model.attention}); "
                     "its float32 [seq, seq] scores count in temp, which flash kernels avoid")
    return dataclasses.replace(arch, attention="xla"), notes


def compile_steps(cfg: Config, devices: list | None = None, target: TpuTarget | None = None, slices: int = 1,
                  generate: GenerateShape | None = None, cost: bool = True) -> CompileReport:
    """Compile the train step (and with ``generate`` the prefill and decode steps) for ``cfg`` on
    ``devices`` (default: all of JAX's) with abstract inputs; with a ``target`` (and ``cost``), also
    the train step's loop-corrected cost (:func:`train_cost`, two more compiles)."""
    devices = list(jax.devices() if devices is None else devices)
    platform = devices[0].platform
    arch, notes = compile_arch(cfg, platform)
    program = build_program(cfg, devices, arch)
    state, batch = program.abstract_inputs()
    tokens = cfg.data.global_batch * cfg.data.seq_len
    mesh = program.mesh
    chip = None if target is None else dict(name=target.name, peak_flops=target.chip.peak_flops,
                                            hbm_bytes=target.chip.hbm_bytes, hbm_bandwidth=target.chip.hbm_bandwidth)
    report = functools.partial(CompileReport, preset=cfg.model.preset, devices=mesh.size, mesh=dict(mesh.shape),
                               dtype=arch.dtype, attention=arch.attention, n_layers=arch.n_layers,
                               target=None if target is None else target.name, chip=chip, slices=slices, notes=notes)
    try:
        train, seconds = _compile("the train step", lambda: program.train_step.lower(state, batch))
    except RunError as e:
        if not _out_of_memory(e) or target is None:
            raise
        # The TPU compiler refuses a program that cannot fit: that is the answer, not a failure.
        return report(steps=[StepStats("train step", 0.0, 0, 0, 0, 0, 0, 0, error=_out_of_memory(e))])
    stats = step_stats("train step", train, seconds, flops_per_token(arch, cfg.data.seq_len) * tokens / len(devices),
                       tokens)
    if target is not None and cost:
        try:
            flops, nbytes, cost_notes = train_cost(cfg, devices, arch)
            stats = dataclasses.replace(stats, flops=flops, bytes_accessed=nbytes)
            notes += cost_notes
        except RunError as e:
            if not _out_of_memory(e):
                raise
            # Without loops the compiler cannot reuse one layer's buffers for the next.
            notes.append(f"no FLOPs/roofline: the loop-free cost variants do not fit in HBM ({_out_of_memory(e)})")
    steps = [stats]
    if generate is not None:
        steps += generate_steps(cfg, devices, arch, generate)
    return report(steps=steps)


def compile_train_step(cfg: Config, devices: list | None = None) -> StepStats:
    """The train step's figures alone (the planner's tests compare against them)."""
    return compile_steps(cfg, devices).train


def _out_of_memory(e: Exception) -> str:
    """The compiler's out-of-HBM message in ``e`` ('' when it is another error)."""
    m = re.search(r"(?:RESOURCE_EXHAUSTED|Ran out of memory)[^\n]*", str(e))
    return m.group(0).strip() if m else ""


def _compile(what: str, lower, options: dict | None = None) -> tuple:
    """(compiled, seconds) of ``lower().compile(options)``; a compiler error becomes one line."""
    return _timed(what, lambda: lower().compile(compiler_options=options))


def _timed(what: str, fn) -> tuple:
    start = time.perf_counter()
    try:
        result = fn()
    except JaxllamaError:
        raise
    except Exception as e:  # XLA reports sharding/shape/memory problems as assorted exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"compiling {what} failed: {first}") from e
    return result, time.perf_counter() - start


# TPU compiler options for the cost variants: no windowed einsums (the same FLOPs, without loops).
NO_COMPILER_LOOPS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                     "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def train_cost(cfg: Config, devices: list, arch: Arch) -> tuple[float, float, list[str]]:
    """Per-chip FLOPs and HBM bytes of one train step, from the compiler's cost analysis.

    XLA's cost analysis counts the body of a loop once, whatever its trip count, and the step has
    three loops (the scan over layers, the loss chunks, the micro-batches) and, on TPU, those the
    compiler makes itself (collective matmuls: an all-gather or reduce-scatter overlapped with a
    matmul, one shard per iteration). So two loop-free variants are compiled -- layers and loss chunks
    unrolled, one micro-batch, collective matmuls off (:data:`NO_COMPILER_LOOPS`) -- with 1 and 2
    layers; their difference is one layer, and the step is ``grad_accum x (c1 + (layers - 1) x (c2 - c1))``.
    The splash kernel is opaque to the analysis (a custom call), so its FLOPs are added from the
    model count (times 4/3 when remat recomputes the forward pass)."""
    ga = cfg.train.grad_accum
    costs = []
    for n in (1, 2):
        c = copy.deepcopy(cfg)
        c.model.n_layers, c.model.scan_layers = n, False
        c.train.grad_accum = 1
        c.data.global_batch //= ga
        a = dataclasses.replace(arch, n_layers=n, scan_layers=False)
        program = build_program(c, devices, a, unroll_loss=True)
        compiled, _ = _compile(f"the {n}-layer cost variant", lambda: program.train_step.lower(
            *program.abstract_inputs()), NO_COMPILER_LOOPS if devices[0].platform == "tpu" else None)
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        costs.append((float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))))
    (f1, b1), (f2, b2) = costs
    layers = arch.n_layers
    flops, nbytes = ga * (f1 + (layers - 1) * (f2 - f1)), ga * (b1 + (layers - 1) * (b2 - b1))
    notes = [f"FLOPs and bytes: XLA cost analysis of 1- and 2-layer loop-free variants, extrapolated to {layers} "
             "layers" + (f" x grad_accum {ga} (the optimizer update is counted once per micro-batch)" if ga > 1 else "")]
    if arch.attention == "splash":
        tokens = cfg.data.global_batch * cfg.data.seq_len / len(devices)
        attn = 6 * layers * arch.n_heads * arch.head_dim * cfg.data.seq_len * tokens
        attn *= 4 / 3 if arch.remat != "none" else 1
        flops += attn
        notes.append(f"splash kernel FLOPs ({attn:.3g} per chip) added from the model count: XLA cannot see "
                     "inside the Pallas kernel")
    return flops, nbytes, notes


def generate_steps(cfg: Config, devices: list, arch: Arch, shape: GenerateShape) -> list[StepStats]:
    """The prefill and one decode step of ``jaxllama generate`` on the configured mesh and rules, with
    the inference model (compute and weights in the compute dtype, layers unrolled)."""
    from jaxllama.infer.engine import lower_generate
    from jaxllama.infer.placement import inference_arch

    a = inference_arch(arch, scan_layers=False)
    c = copy.deepcopy(cfg)
    c.train.grad_accum = 1
    probe = build_program(c, devices, a)
    rows = shape.batch or probe.layout.shards("activation_batch")
    c.data.global_batch, c.data.seq_len = rows, shape.prompt_len
    program = build_program(c, devices, a)
    params = program.model_params(program.abstract_inputs()[0].params)
    (prefill, decode), seconds = _timed("the generate steps", lambda: lower_generate(
        params, a, program.layout, rows, shape.prompt_len, shape.max_new))
    n = len(devices)
    cache = shape.prompt_len + shape.max_new
    per_token = 2 * matmul_params(a)
    prefill_flops = (per_token + 2 * a.n_layers * a.n_heads * a.head_dim * shape.prompt_len) * rows * shape.prompt_len
    decode_flops = (per_token + 2 * a.dim * a.vocab_size + 4 * a.n_layers * a.n_heads * a.head_dim * cache) * rows
    out = []
    for name, compiled, model_flops, tokens in (
            (f"prefill ({rows} x {shape.prompt_len} tokens)", prefill, prefill_flops, rows * shape.prompt_len),
            (f"decode step ({rows} rows, cache {cache})", decode, decode_flops, rows)):
        s = step_stats(name, compiled, seconds / 2, model_flops / n, tokens)
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        # The decode loop's body (one token per row) is counted once: exactly one decode step.
        out.append(dataclasses.replace(s, flops=float(ca.get("flops", 0.0)),
                                       bytes_accessed=float(ca.get("bytes accessed", 0.0))))
    return out


def with_slices(overrides: list[str], cfg: Config, slices: int) -> list[str]:
    """``--slices N``: the slices are data-parallel over DCN (``mesh.dcn_data=N``) unless the config
    already says how; then its DCN sizes must multiply to N."""
    m = cfg.mesh
    dcn = m.dcn_data * m.dcn_fsdp * m.dcn_tensor
    if dcn == slices:
        return list(overrides)
    if dcn == 1:
        return [*overrides, f"mesh.dcn_data={slices}"]
    raise ConfigError(f"--slices {slices}: mesh.dcn_data x dcn_fsdp x dcn_tensor = {dcn}; make them multiply to "
                      f"{slices}")


def compile_check(config: str | None, overrides: list[str], devices: int | None = None, target: str | None = None,
                  slices: int = 1, generate: GenerateShape | None = None, timeout_s: float = 3600) -> CompileReport:
    """Validate the config for the devices, then compile in a process set up for them.

    Runs in this process when it already has exactly ``devices`` simulated CPU devices (the tests);
    otherwise re-executes ``python -m jaxllama.compile_check`` with the device count or the TPU
    environment set before JAX starts.
    """
    if (devices is None) == (target is None):
        raise ConfigError("compile-check: give --target TPU_SLICE (e.g. v5p-64) or --devices N (simulated CPU)")
    cfg = load_train_config(config, overrides)
    tpu = None
    if target is not None:
        tpu = TpuTarget.parse(target)
        if slices < 1:
            raise ConfigError(f"--slices: must be >= 1, got {slices}")
        overrides = with_slices(overrides, cfg, slices)
        cfg = load_train_config(config, overrides)
        devices = tpu.chips * slices
    elif slices != 1:
        raise ConfigError("--slices: only with --target (a multi-slice TPU pod)")
    build_program(cfg, devices)  # abstract: the mesh and shard checks fail fast, before a process start
    if tpu is None and _simulating(devices) and jax.device_count() == devices:
        return compile_steps(cfg, generate=generate)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "jaxllama.compile_check"]
    if tpu is None:
        env["XLA_FLAGS"] = (f"{_strip_device_count(os.environ.get('XLA_FLAGS', ''))} "
                            f"--xla_force_host_platform_device_count={devices}").strip()
        cmd += ["--devices", str(devices)]
    else:
        check_libtpu()
        cmd += ["--target", tpu.name, "--slices", str(slices)]
    if generate is not None:
        cmd += ["--generate", f"{generate.batch},{generate.prompt_len},{generate.max_new}"]
    cmd += (["--config", str(config)] if config else []) + ["--", *overrides]
    where = f"{devices} devices" if tpu is None else f"{slices} x {tpu.name}"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RunError(f"compile-check: compiling for {where} took over {timeout_s:.0f}s") from None
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunError(f"compile-check: the compiling process exited {proc.returncode}: {tail}") from None
    if "error" in result:
        raise (ConfigError if result["exit_code"] == 2 else RunError)(result["error"])
    return CompileReport.from_json(result)


def _simulating(devices: int) -> bool:
    """True when this process is set up (by environment) as ``devices`` CPU devices. Decided without
    starting a JAX backend, which on a GPU host would claim most of the GPU memory for nothing."""
    flags = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return os.environ.get("JAX_PLATFORMS") == "cpu" and bool(flags) and int(flags[-1]) == devices


def _strip_device_count(flags: str) -> str:
    return re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags).strip()


def parse_generate(text: str) -> GenerateShape:
    """``"BATCH,PROMPT,NEW"`` (the child's form of the generate flags)."""
    b, p, n = (int(x) for x in text.split(","))
    return GenerateShape(b, p, n)


def _child(argv: list[str]) -> int:
    """Entry of the re-executed process: compile, print the report as one JSON line."""
    import argparse

    p = argparse.ArgumentParser(prog="jaxllama.compile_check")
    p.add_argument("--devices", type=int)
    p.add_argument("--target")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--generate")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        generate = parse_generate(args.generate) if args.generate else None
        if args.target:
            tpu = TpuTarget.parse(args.target)
            report = compile_steps(cfg, target_devices(tpu, args.slices), tpu, args.slices, generate)
        else:
            if jax.device_count() != args.devices:
                raise RunError(f"compile-check: asked for {args.devices} simulated devices, JAX has "
                               f"{jax.device_count()}")
            report = compile_steps(cfg, generate=generate)
        print(json.dumps(asdict(report)))
    except JaxllamaError as e:
        print(json.dumps(dict(error=str(e), exit_code=e.exit_code)))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
