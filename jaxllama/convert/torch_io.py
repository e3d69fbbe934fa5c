"""PyTorch checkpoint files (Meta ``consolidated.NN.pth``, HF ``*.bin``): safe loading and numpy bridging.

Always ``torch.load(weights_only=True)``: a checkpoint is data, and a plain unpickle would run
whatever code the file names. ``mmap=True`` keeps untouched tensors on disk. torch is imported
lazily, so the rest of conversion (and inference) works on machines without it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from jaxllama.convert.common import BF16
from jaxllama.errors import ConfigError


def _torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("reading or writing .pth/.bin checkpoints needs PyTorch (pip install torch, or the "
                          "meta extra: pip install -e '.[meta]')") from None
    return torch


def load_state_dict(path: Path) -> dict:
    torch = _torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError... for damaged files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: cannot load as a PyTorch checkpoint ({msg})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(BF16)
    return t.numpy()


def from_numpy(a: np.ndarray):
    """A tensor sharing ``a``'s memory (read-only memmaps too: the tensor is only ever saved, never written)."""
    torch = _torch()
    a = np.ascontiguousarray(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable NumPy array"
        if a.dtype == BF16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


def save_state_dict(state: dict, path: Path) -> None:
    _torch().save({k: from_numpy(v) for k, v in state.items()}, path)
