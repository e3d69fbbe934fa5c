"""Plan before launch: what a training run costs per device (memory) and per token (FLOPs), on a
mesh that need not be present; what ``jaxllama info`` prints.

``plan(cfg, devices=256, device_memory=parse_size("95GB", "--device-memory"))`` answers "does
llama3-8b with this mesh fit a v5p-512?" on a laptop. The program is built by the same builder as
training (:func:`jaxllama.program.build_program`) on an abstract mesh of ``devices`` (sizes and
names, no devices), so the per-device figures of parameters and optimizer state are the shards
training would create. Nothing is materialized.

FLOPs per trained token follow ARCHITECTURE.md: ``6*(N_matmul + d_model*V) + 6*L*H*d_head*T``
where N_matmul is every per-layer matmul weight (attention and MLP projections; not the input
embedding) and ``d_model*V`` is the LM head, counted even when tied. The last term is causal
attention; the non-causal figure (``12*L*H*d_head*T``, nanoGPT/torchtitan) is given beside it.

Activations cannot be read off shapes, so they are *estimated* from the decoder's structure (which
tensors the backward pass keeps for each ``model.remat`` policy) -- the same accounting as
Korthikanti et al. 2022, adapted to this model. ``jaxllama compile-check`` gives XLA's own figure
for the same configuration; the tests hold the estimate to it.

The planner targets accelerators: ``model.dtype: auto`` counts as bfloat16 and ``attention: auto``
as a flash kernel (cuDNN / splash: no ``[seq, seq]`` scores kept). The ``xla`` reference keeps no
scores either (its backward recomputes them) but materializes one layer's float32 scores and their
gradients at a time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax

from jaxllama.config import Config
from jaxllama.errors import ConfigError
from jaxllama.model.llama import Arch, param_shapes
from jaxllama.parallel.sharding import per_device_bytes
from jaxllama.program import build_program
from jaxllama.program.step import loss_chunk_size

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def matmul_params(a: Arch) -> int:
    """Per-layer matmul weights times layers (excludes the embedding and the LM head), counted off the
    model's own parameter shapes."""
    base = dataclasses.replace(a, lora_rank=0, quantize="none")  # the model's math: adapters are ~rank/dim of it
    return sum(math.prod(shape) for name, shape in param_shapes(base).items()
               if name.startswith("layers/") and name.endswith("/kernel"))


def flops_per_token(a: Arch, seq_len: int, causal: bool = True) -> float:
    attention = (6 if causal else 12) * a.n_layers * a.n_heads * a.head_dim * seq_len
    return 6.0 * (matmul_params(a) + a.dim * a.vocab_size) + attention


def target_arch(cfg: Config) -> Arch:
    """The architecture as an accelerator would run it: ``auto`` dtype -> bfloat16, ``auto`` attention
    -> a flash kernel (recorded as ``dot_product``), independent of the backend planning runs on."""
    return dataclasses.replace(Arch.from_config(cfg.model, cfg.train.lora), dtype="bfloat16" if cfg.model.dtype == "auto" else
                               cfg.model.dtype, attention="dot_product" if cfg.model.attention == "auto" else
                               cfg.model.attention)


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes per device: kept across the forward pass (all layers), the largest transient, and the loss."""

    saved: int  # what the backward pass keeps for every layer
    layer_peak: int  # one layer's full activations while it is (re)computed / differentiated
    loss: int  # one chunk of float32 logits and their gradient, the final hidden states
    total: int


def estimate_activations(a: Arch, sizes: dict[str, int], seq_len: int, global_batch: int,
                         grad_accum: int = 1, loss_chunk: int = 0) -> ActivationEstimate:
    """Activation bytes on one device for one micro-batch (see the module docstring for the model).

    Rows are split over ``data x fsdp`` and heads / MLP columns over ``tensor``; the residual stream
    ``[batch, len, embed]`` is replicated over ``tensor`` (as the default rules lay it out).
    """
    b = _DTYPE_BYTES[a.dtype]
    tp = sizes["tensor"]
    rows = max(1, global_batch // (sizes["data"] * sizes["fsdp"] * grad_accum))
    tokens = rows * seq_len
    d, q, kv, f = a.dim, a.n_heads * a.head_dim / tp, a.n_kv_heads * a.head_dim / tp, a.ffn_dim / tp
    # Per token, per layer, in compute-dtype elements unless noted (fp32 = two bf16 slots):
    full = (d + d  # block input, input_layernorm output
            + q + 2 * kv  # q, k, v projections
            + q + kv  # q and k after RoPE
            + q  # attention output (flash kernels keep it plus a float32 logsumexp per head)
            + d + d + d  # o_proj output, residual, post_attention_layernorm output
            + 3 * f  # gate, up, silu(gate) * up
            + d)  # down_proj output
    full_bytes = full * b + (a.n_heads / tp) * 4 + 2 * d * 4  # logsumexp; float32 rsqrt/norm inputs
    scores = 0.0
    if a.attention == "xla":  # the reference kernel keeps only a logsumexp too, but while one layer is
        # differentiated it recomputes float32 scores/probabilities and their gradients [heads, len] per token
        scores = (a.n_heads / tp) * seq_len * 12
    if a.remat == "none":
        per_layer = full_bytes
    elif a.remat == "save_dots":  # weight-matmul outputs only: q, k, v, o, gate, up, down, plus the input
        per_layer = (d + q + 2 * kv + d + 2 * f + d) * b
    else:  # full: only each block's input survives; one block is recomputed at a time
        per_layer = d * b
    saved = int(per_layer * tokens * a.n_layers)
    # Backward through one layer: its recomputed activations (under remat) plus the residual-stream
    # gradient, and with the xla kernel the float32 score gradients.
    layer_peak = int(((full_bytes if a.remat != "none" else 0) + 2 * d * b + scores) * tokens)
    chunk = loss_chunk_size(seq_len, a.vocab_size, loss_chunk)
    loss = int(rows * chunk * (a.vocab_size / tp) * 4 * 3 + tokens * d * (b + 4))
    return ActivationEstimate(saved=saved, layer_peak=layer_peak, loss=loss, total=saved + layer_peak + loss)


def plan(cfg: Config, devices: int | None = None, device_memory: int | None = None, program: Any = None) -> dict:
    """Per-device memory of training ``cfg`` on ``devices`` (default: the devices present).

    Returns a dict of byte counts (params, optimizer, gradients, gathered layer weights,
    activations, total) plus the mesh and, when ``device_memory`` is given, ``fits``. ``program``:
    plan this already built program (as it will run here) instead of the accelerator's.
    """
    devices = jax.device_count() if devices is None else devices
    program = program or build_program(cfg, devices, target_arch(cfg))
    arch, abstract, shardings = program.arch, program.abstract_state, program.state_shardings
    whole, whole_sh = abstract.model_tree(), shardings.model_tree()  # a LoRA state: frozen base + adapters
    params = per_device_bytes(whole, whole_sh)
    opt = per_device_bytes(abstract.opt_state, shardings.opt_state)
    sizes = program.plan.shape
    # FSDP gathers one layer's weights (compute dtype, still split over tensor) for its matmuls, and
    # XLA overlaps the next layer's gather with this one: two layers' worth in flight.
    layer_params = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(whole["layers"]))
    gathered = int(2 * layer_params / sizes["tensor"] * _DTYPE_BYTES[arch.dtype])
    act = estimate_activations(arch, sizes, cfg.data.seq_len, cfg.data.global_batch, cfg.train.grad_accum,
                               cfg.train.loss_chunk)
    grads = per_device_bytes(abstract.params, shardings.params)  # of the trained params only, sharded like them
    # DPO with a separate reference: its frozen weights (its forward pass keeps no activations)
    ref = per_device_bytes(abstract.reference, shardings.reference) if abstract.reference is not None else 0
    total = params + opt + grads + ref + gathered + act.total
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    out = dict(preset=cfg.model.preset, params=count(whole), trainable=count(abstract.params),
               lora_rank=arch.lora_rank,
               mesh=sizes, devices=devices, dtype=arch.dtype, remat=arch.remat, attention=arch.attention,
               rows=cfg.data.global_batch // (program.layout.shards("activation_batch") * cfg.train.grad_accum),
               flops_per_token=flops_per_token(arch, cfg.data.seq_len),
               flops_per_token_noncausal=flops_per_token(arch, cfg.data.seq_len, causal=False),
               seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch, grad_accum=cfg.train.grad_accum,
               param_bytes=params, opt_bytes=opt, grad_bytes=grads, reference_bytes=ref, gathered_bytes=gathered,
               act_saved_bytes=act.saved, act_peak_bytes=act.layer_peak, loss_bytes=act.loss,
               total_bytes=total, device_memory=device_memory)
    if device_memory is not None:
        out["fits"] = total <= device_memory
    return out


def check_host_memory(program: Any) -> None:
    """On CPU every (simulated) device lives in this host's RAM: refuse a run the plan says cannot fit,
    with one line, instead of being killed by the kernel's OOM killer minutes later."""
    if jax.default_backend() != "cpu":
        return
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: no check
        return
    cfg, devices = program.cfg, program.plan.size
    need = plan(cfg, devices, program=program)["total_bytes"] * min(devices, jax.local_device_count())
    if need > avail:
        raise ConfigError(f"model.preset={cfg.model.preset}: training needs about {need / 2**30:.1f} GiB on this CPU "
                          f"(parameters, AdamW state, gradients, activations: see `jaxllama info`) but "
                          f"{avail / 2**30:.1f} GiB is available; use fewer layers (e.g. model.n_layers=2), a "
                          "smaller data.global_batch or data.seq_len, or an accelerator")


def format_plan(p: dict) -> str:
    """The plan as the lines ``jaxllama info --devices N`` prints."""
    def g(n: int) -> str:  # GiB, or MiB for small models
        return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 or n == 0 else f"{n / 2**20:8.2f} MiB"

    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"plan:             {p['devices']} devices, mesh {mesh}; {p['dtype']} compute, remat {p['remat']}, "
        f"attention {p['attention']}; {p['rows']} row(s) x {p['seq_len']} tokens per device per micro-batch",
        f"  parameters      {g(p['param_bytes'])}   (master weights, sharded"
        + (f"; the frozen base and LoRA adapters)" if p.get("lora_rank") else ")"),
        f"  optimizer       {g(p['opt_bytes'])}   (AdamW moments of the trained parameters, sharded like them)",
        f"  gradients       {g(p['grad_bytes'])}" + ("   (adapters only)" if p.get("lora_rank") else ""),
        *([f"  DPO reference   {g(p['reference_bytes'])}   (a separate frozen copy, sharded like the policy)"]
          if p.get("reference_bytes") else []),
        f"  gathered layers {g(p['gathered_bytes'])}   (FSDP all-gather of ~2 layers' weights)",
        f"  activations     {g(p['act_saved_bytes'])}   (kept for backward, all layers; estimate)",
        f"  layer transient {g(p['act_peak_bytes'])}   (one layer being recomputed/differentiated)",
        f"  loss chunk      {g(p['loss_bytes'])}",
        f"  total           {g(p['total_bytes'])}",
    ]
    if p.get("device_memory") is not None:
        mem = p["device_memory"]
        verdict = "FITS" if p["fits"] else "DOES NOT FIT"
        lines.append(f"  device memory   {g(mem)}   -> {verdict} ({100 * p['total_bytes'] / mem:.0f}% used)")
    return "\n".join(lines)


def format_info(info: dict) -> str:
    """The lines ``jaxllama info`` prints (the plan follows with --devices / --device-memory)."""
    gib = 1024**3
    mesh = " x ".join(f"{k}={v}" for k, v in info["mesh"].items())
    state = info["param_bytes"] + info["opt_bytes"]
    return "\n".join([
        f"model:            {info['preset']}",
        f"parameters:       {info['params']:,}",
        *([f"trainable:        {info['trainable']:,} (LoRA rank {info['lora_rank']}: "
           f"{100 * info['trainable'] / info['params']:.2f}% of the parameters; the base is frozen)"]
          if info.get("lora_rank") else []),
        f"mesh:             {mesh} ({info['devices']} devices)",
        f"per device:       params {info['param_bytes'] / gib:.3f} GiB + optimizer "
        f"{info['opt_bytes'] / gib:.3f} GiB = {state / gib:.3f} GiB"
        + (f" (+ gradients {info['grad_bytes'] / gib:.4f} GiB)" if info.get("lora_rank") else "")
        + (f" (+ DPO reference {info['reference_bytes'] / gib:.3f} GiB)" if info.get("reference_bytes") else ""),
        f"train FLOPs/token: {info['flops_per_token']:.4g} at data.seq_len={info['seq_len']} "
        f"(non-causal {info['flops_per_token_noncausal']:.4g}; set data.seq_len and data.global_batch to plan your run)",
    ])
