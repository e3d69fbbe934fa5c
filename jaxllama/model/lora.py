"""LoRA adapters: which leaves of the parameter tree are adapters, splitting the tree into the
trainable adapters and the frozen base, merging them back, and folding an adapter into its kernels.

The model owns the math (``Linear._lora`` in :mod:`jaxllama.model.llama`): every targeted projection
``kernel [in, out]`` gets ``lora_a [in, rank]`` and ``lora_b [rank, out]`` beside it, stacked on the
``layers`` axis like the kernel, and computes ``x W + alpha / rank * x A B``. A LoRA train state holds
only the adapters as ``params`` (gradients and optimizer state exist for them alone) and the base as
``frozen``, the same arrays the run loaded, never copied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ADAPTER_LEAVES = ("lora_a", "lora_b")


def _is_adapter(key: str) -> bool:
    return key in ADAPTER_LEAVES


def split(tree: dict) -> tuple[dict, dict]:
    """(adapters, base) of a nested dict whose adapter leaves are named ``lora_a``/``lora_b``; both keep
    the full paths. Works for arrays, shardings and abstract values alike."""
    adapters, base = {}, {}
    for k, v in tree.items():
        if isinstance(v, dict):
            a, b = split(v)
            if a:
                adapters[k] = a
            if b:
                base[k] = b
        elif _is_adapter(k):
            adapters[k] = v
        else:
            base[k] = v
    return adapters, base


def merge(base: dict | None, adapters: dict) -> dict:
    """The model's whole tree: ``base`` with ``adapters`` put back beside their kernels (no arrays copied).
    ``base`` None: ``adapters`` is already the whole tree (full fine-tuning)."""
    if base is None:
        return adapters
    out = dict(base)
    for k, v in adapters.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and k in base else v
    return out


def adapted_kernels(adapters: dict, prefix: str = "") -> list[str]:
    """Paths of the kernels that have an adapter (``layers/self_attn/q_proj``), sorted."""
    out = []
    for k, v in adapters.items():
        if isinstance(v, dict):
            if "lora_a" in v:
                out.append(f"{prefix}{k}")
            else:
                out += adapted_kernels(v, f"{prefix}{k}/")
    return sorted(out)


def fold(kernel: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, alpha: float, rank: int) -> np.ndarray:
    """``kernel + alpha / rank * A B`` in float32, cast back to the kernel's dtype (stacked layers work:
    the leading axes broadcast)."""
    delta = np.matmul(np.asarray(lora_a, np.float32), np.asarray(lora_b, np.float32)) * (alpha / rank)
    return (np.asarray(kernel, np.float32) + delta).astype(np.asarray(kernel).dtype)


def merged_weights(base: dict, adapters: dict, alpha: float, rank: int) -> dict:
    """The base tree with every adapter folded into its kernel: a plain model (``--merge-lora``)."""
    out = {}
    for k, v in base.items():
        sub = adapters.get(k) if isinstance(adapters, dict) else None
        if isinstance(v, dict) and isinstance(sub, dict) and "lora_a" in sub and "kernel" in v:
            out[k] = {**v, "kernel": fold(v["kernel"], sub["lora_a"], sub["lora_b"], alpha, rank)}
        elif isinstance(v, dict):
            out[k] = merged_weights(v, sub or {}, alpha, rank)
        else:
            out[k] = v
    return out


def count(tree: Any) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
