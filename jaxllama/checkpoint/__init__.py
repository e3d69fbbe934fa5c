"""Orbax checkpoints: training state with resume (``manager``), parameters alone (``params``)."""

from jaxllama.checkpoint.params import load_params, save_params

__all__ = ["load_params", "save_params"]
