"""Compiling for real TPUs on this CPU: the TPU compiler (libtpu) builds the train and decode steps
for a TPU topology with the real kernels (splash as a Mosaic kernel, no substitution).

Needs the ``libtpu`` wheel (the ``tpu`` extra, part of ``test``); skipped with that reason only when
it cannot be installed on this platform. Kept small (2 layers, or the ``tiny`` shapes): each TPU
compile takes tens of seconds on 2 cores.
"""

import dataclasses
import importlib.util
import math

import jax
import pytest

from jaxllama.compile_check import CompileReport, GenerateShape, compile_steps, train_cost
from jaxllama.config import load_config
from jaxllama.errors import ConfigError
from jaxllama.model.llama import Arch, param_shapes
from jaxllama.parallel.chips import TpuTarget, chip_for, target_devices
from jaxllama.roofline import format_report, roofline

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the TPU compiler) is not installable on this platform")


@pytest.fixture(autouse=True)
def default_precision():
    """conftest asks for "highest" matmul precision (CPU parity tests); Mosaic kernels compile only
    at the default one, which is what training on a TPU uses."""
    with jax.default_matmul_precision("default"):
        yield


@pytest.mark.parametrize("name, chips, topology", [
    ("v5p-64", 32, "v5p:2x4x4"), ("v5e-256", 256, "v5e:16x16"), ("v6e-8", 8, "v6e:2x4"), ("v4-32", 16, "v4:2x2x4"),
    ("v5p-8", 4, "v5p:2x2x1"), ("v5litepod-16", 16, "v5e:4x4"), ("v5p-1024", 512, "v5p:8x8x8")])
def test_slice_names_resolve_to_chips_and_topologies(name, chips, topology):
    t = TpuTarget.parse(name)
    assert (t.chips, t.topology) == (chips, topology)


@pytest.mark.parametrize("name", ["v5p", "v5p-63", "h100-8", "v5e-0", "v5p-12"])
def test_bad_slice_names_are_one_line_errors(name):
    with pytest.raises(ConfigError, match="--target"):
        TpuTarget.parse(name)


def test_chip_table_matches_device_kinds():
    # jax's device_kind strings for v5e ("TPU v5 lite") and v5p ("TPU v5") overlap: v5e must win.
    assert chip_for("TPU v5 lite").name == "v5e" and chip_for("TPU v5").name == "v5p"
    assert chip_for("NVIDIA H200").hbm_bytes == 141 * 10**9 and chip_for("cpu") is None


def test_roofline_takes_the_slower_bound():
    from jaxllama.roofline import StepStats

    chip = dict(name="x", peak_flops=100.0, hbm_bytes=1, hbm_bandwidth=10.0)
    s = StepStats("s", 0, 0, 0, 0, 0, 0, 0, flops=200.0, bytes_accessed=10.0, model_flops=150.0, tokens=4)
    r = roofline(s, chip)
    assert r["seconds"] == 2.0 and r["bound"] == "compute" and r["mfu_bound"] == 0.75
    r = roofline(dataclasses.replace(s, bytes_accessed=100.0), chip)
    assert r["seconds"] == 10.0 and r["bound"] == "HBM bandwidth" and r["mfu_bound"] == 0.15


@needs_libtpu
def test_llama_1b_cut_to_2_layers_compiles_for_v5e_8_with_splash_and_packed_segments():
    """Train step (splash under shard_map, GQA, heads over tensor, fsdp, packed segment ids) and the
    generate steps (prefill + decode over a sharded KV cache) for a v5e-8, by the TPU compiler."""
    target = TpuTarget.parse("v5e-8")
    cfg = load_config(None, ["model.preset=llama3.2-1b", "model.n_layers=2", "data.seq_len=1024",
                             "data.global_batch=8", "mesh.fsdp=4", "mesh.tensor=2", "data.packing=pack"])
    report = compile_steps(cfg, target_devices(target), target, generate=GenerateShape(0, 256, 64), cost=False)
    assert report.attention == "splash" and report.mesh == dict(data=1, fsdp=4, tensor=2)
    train, prefill, decode = report.steps
    # The real kernel: splash's forward, dq and dkv Mosaic kernels, not an interpreted reference.
    assert train.kernels.get("tpu_custom_call", 0) >= 3, train.kernels
    assert train.collectives.get("all-gather", 0) > 0  # fsdp gathers weights
    assert 0 < train.peak_bytes < target.chip.hbm_bytes
    # Parameters + AdamW moments in float32 (12 bytes each), split over 8 chips, + the batch shard.
    n_params = sum(math.prod(s) for s in param_shapes(Arch.from_config(cfg.model)).values())
    assert train.argument_bytes == pytest.approx(12 * n_params / 8, rel=0.01), (train.argument_bytes, n_params)
    assert prefill.kernels.get("tpu_custom_call", 0) >= 1  # a 256-token prefill runs splash too
    # The decode step holds bf16 params (1/8 each) and its cache shard; it donates the cache.
    assert decode.alias_bytes > 0 and decode.argument_bytes < train.argument_bytes / 4
    text = format_report(report)
    assert "FITS" in text and "v5e-8" in text and "decode step" in text
    assert CompileReport.from_json(dataclasses.asdict(report)).steps[2] == decode


@needs_libtpu
def test_train_cost_extrapolation_equals_the_fully_unrolled_program():
    """XLA counts a loop body once; the loop-free extrapolation must give what an unrolled program
    of all layers costs (the tiny shapes, 4 layers, one chip: a cheap compile)."""
    target = TpuTarget.parse("v5e-1")
    devices = target_devices(target)
    base = ["model.preset=tiny", "model.attention=xla", "model.dtype=bfloat16", "data.seq_len=256",
            "data.global_batch=4", "train.loss_chunk=64",  # 4 loss chunks, each rematerialized
            "model.scan_layers=true"]  # tiny's default is unrolled
    cfg = load_config(None, base)
    from jaxllama.compile_check import compile_arch
    from jaxllama.program import build_program

    arch, _ = compile_arch(cfg, "tpu")
    flops, nbytes, _ = train_cost(cfg, devices, arch)
    unrolled = load_config(None, [*base, "model.scan_layers=false"])
    program = build_program(unrolled, devices, dataclasses.replace(arch, scan_layers=False), unroll_loss=True)
    ca = program.train_step.lower(*program.abstract_inputs()).compile().cost_analysis()
    assert flops == pytest.approx(ca["flops"], rel=0.01)
    # Bytes depend on fusion, which differs a little between depths: an estimate, within a quarter.
    assert nbytes == pytest.approx(ca["bytes accessed"], rel=0.25)
    # ...and the scanned program XLA reports alone undercounts: that is why the variants exist.
    scanned = build_program(cfg, devices, arch)
    short = scanned.train_step.lower(*scanned.abstract_inputs()).compile().cost_analysis()["flops"]
    assert short < 0.6 * flops


@needs_libtpu
def test_multi_slice_compiles_over_dcn():
    """--slices 2: two v5e-4 slices, data-parallel over DCN (mesh.dcn_data=2), tiny shapes."""
    from jaxllama.compile_check import with_slices
    from jaxllama.program import build_program

    target = TpuTarget.parse("v5e-4")
    base = ["model.preset=tiny", "data.seq_len=256", "data.global_batch=16", "mesh.fsdp=-1", "model.remat=full",
            "train.grad_accum=2"]
    cfg = load_config(None, with_slices(base, load_config(None, base), 2))
    devices = target_devices(target, slices=2)
    program = build_program(cfg, devices)
    assert dict(program.mesh.shape) == dict(data=2, fsdp=4, tensor=1)
    # Each data row of the mesh is one slice.
    slices = [{d.slice_index for d in row.flat} for row in program.mesh.devices]
    assert slices == [{0}, {1}], slices
    report = compile_steps(cfg, devices, target, slices=2, cost=False)
    assert report.devices == 8 and report.train.collectives.get("all-reduce", 0) > 0


def test_missing_tpu_compiler_names_the_install_command(monkeypatch):
    from jaxllama.parallel.chips import check_libtpu

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
        check_libtpu()
