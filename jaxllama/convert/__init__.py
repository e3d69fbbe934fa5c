"""Checkpoint conversion to and from Hugging Face, Meta and GGUF; every converter maps the one canonical tree.

``load_model(path)`` reads any supported checkpoint for inference; ``convert(src, dst, to=...)`` is
what ``jaxllama convert`` runs. Heavy dependencies (torch, gguf, tokenizers) load only when needed.
"""

from jaxllama.convert.api import FORMATS, LoadedModel, convert, detect_format, load_model, open_source

__all__ = ["FORMATS", "LoadedModel", "convert", "detect_format", "load_model", "open_source"]
