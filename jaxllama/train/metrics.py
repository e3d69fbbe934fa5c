"""FLOPs per token, MFU, and where metrics go (terminal, metrics.jsonl, TensorBoard).

FLOPs per trained token follow ARCHITECTURE.md: ``6*(N_matmul + d_model*V) + 6*L*H*d_head*T``
where N_matmul is every per-layer matmul weight (attention and MLP projections; not the input
embedding) and ``d_model*V`` is the LM head, counted even when tied. The last term is causal
attention; the non-causal figure (``12*L*H*d_head*T``, nanoGPT/torchtitan) is logged beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllama.model.llama import Arch

# Dense bf16 peak FLOP/s per device, matched against jax's device_kind (first match wins).
PEAK_FLOPS = [
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
]


def matmul_params(a: Arch) -> int:
    """Per-layer matmul weights times layers (excludes the embedding and the LM head)."""
    attn = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)
    mlp = 3 * a.dim * a.ffn_dim
    return a.n_layers * (attn + mlp)


def flops_per_token(a: Arch, seq_len: int, causal: bool = True) -> float:
    attention = (6 if causal else 12) * a.n_layers * a.n_heads * a.head_dim * seq_len
    return 6.0 * (matmul_params(a) + a.dim * a.vocab_size) + attention


def measure_cpu_flops(seconds: float = 0.5) -> float:
    """Sustained float32 matmul FLOP/s of this host (all cores), for MFU on CPU."""
    n = 512
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda m: m @ m)
    f(x).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(x).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops_per_device(configured: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if configured:
        return configured, "configured (train.peak_flops)"
    kind = jax.devices()[0].device_kind
    for name, value in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return value, f"table ({kind} bf16 dense)"
    if jax.default_backend() == "cpu":
        # Simulated CPU devices share the host's cores, so each gets an equal part of the host.
        return measure_cpu_flops() / jax.local_device_count(), "measured (float32 matmul on this CPU)"
    return 0.0, f"unknown for {kind}: set train.peak_flops"


class MetricsWriter:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl, mirrored to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
