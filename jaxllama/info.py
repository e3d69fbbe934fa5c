"""What ``jaxllama info`` reports: parameter count, per-device memory of the state, FLOPs per token.

Everything comes from abstract shapes (``jax.eval_shape``) on an abstract mesh: a 405B preset is
never materialized, and ``devices`` may name a topology that is not present (``--devices 256``).
The full memory plan (gradients, activations, fits-or-not) is :mod:`jaxllama.plan`.
"""

from __future__ import annotations

import math

import jax

from jaxllama.config import Config
from jaxllama.parallel.sharding import per_device_bytes
from jaxllama.program import build_program
from jaxllama.train.metrics import flops_per_token


def model_info(cfg: Config, devices: int | None = None) -> dict:
    """Counts and per-device state bytes for ``cfg`` on ``devices`` (default: the devices present)."""
    program = build_program(cfg, jax.device_count() if devices is None else devices)
    abstract, shardings, arch = program.abstract_state, program.state_shardings, program.arch
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    return dict(
        preset=cfg.model.preset, params=n_params, mesh=program.plan.shape, devices=program.plan.size,
        param_bytes_per_device=per_device_bytes(abstract.params, shardings.params),
        opt_bytes_per_device=per_device_bytes(abstract.opt_state, shardings.opt_state),
        flops_per_token=flops_per_token(arch, cfg.data.seq_len),
        flops_per_token_noncausal=flops_per_token(arch, cfg.data.seq_len, causal=False),
        seq_len=cfg.data.seq_len)


def format_info(info: dict) -> str:
    """The lines ``jaxllama info`` prints."""
    gib = 1024**3
    mesh = " x ".join(f"{k}={v}" for k, v in info["mesh"].items())
    state = info["param_bytes_per_device"] + info["opt_bytes_per_device"]
    return "\n".join([
        f"model:            {info['preset']}",
        f"parameters:       {info['params']:,}",
        f"mesh:             {mesh} ({info['devices']} devices)",
        f"per device:       params {info['param_bytes_per_device'] / gib:.3f} GiB + optimizer "
        f"{info['opt_bytes_per_device'] / gib:.3f} GiB = {state / gib:.3f} GiB",
        f"train FLOPs/token: {info['flops_per_token']:.4g} at seq_len {info['seq_len']} "
        f"(non-causal {info['flops_per_token_noncausal']:.4g})",
    ])
