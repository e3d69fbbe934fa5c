"""jaxllama's own params-only format (Orbax, via :mod:`jaxllama.checkpoint`) as a conversion end.

Reading streams: each stored array is opened with TensorStore and read one layer at a time
(:func:`jaxllama.checkpoint.params.open_params`). Writing does not: Orbax saves a whole tree at
once (copying it), so writing this format needs about twice the model in memory. Tokenizer files
travel in a ``tokenizer/`` folder beside the Orbax items.

A quantized checkpoint (``convert --to jaxllama --quantize``) stores ``kernel_q``/``kernel_scale``
(and ``embedding_q``/``embedding_scale``) in :mod:`jaxllama.model.quant`'s layout instead of the
float tensors: loading it for inference gives the quantized tree as stored; converting it (to any
format, this one included, unless ``--quantize`` again) reads each tensor dequantized.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxllama.convert.common import Extras, Source, atomic_output, copy_tokenizer_files, stacked_params
from jaxllama.convert.hf import TOKENIZER_FILES, _read_json
from jaxllama.errors import ConfigError

TOKENIZER_DIR = "tokenizer"


class JaxllamaSource(Source):
    def __init__(self, path: str | Path, dtype: np.dtype | None = None):
        from jaxllama.checkpoint.params import open_params

        self.path, self.dtype = Path(path), dtype
        self.params, self.model_cfg = open_params(str(path))  # lazy: nothing is read until _read
        tok = _tokenizer_dir(self.path)
        ex = Extras(tokenizer_dir=tok if tok.is_dir() and any(tok.iterdir()) else None)
        if (tok / "tokenizer_config.json").is_file():
            ex.chat_template = _read_json(tok / "tokenizer_config.json").get("chat_template")
        if (tok / "generation_config.json").is_file():
            gen = _read_json(tok / "generation_config.json")
            ex.generation_config = gen
            ex.bos_token_id, ex.eos_token_id = gen.get("bos_token_id"), gen.get("eos_token_id")
        self.extras = ex

    @property
    def quantized(self) -> bool:
        return any(k.endswith("_q") for k in self.params)

    def quantized_tree(self) -> dict:
        """The stored tree as it is (quantized leaves and all), nested."""
        tree: dict = {}
        for key, arr in self.params.items():
            *parents, leaf = key.split("/")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = np.asarray(arr)
        return tree

    def _read(self, name: str, layer: int | None) -> np.ndarray:
        key = name if layer is None else f"layers/{name}"
        if key not in self.params and f"{key}_q" in self.params:  # a quantized checkpoint, read as float
            from jaxllama.model import quant

            q, scale = (np.asarray(self.params[f"{key}{s}"] if layer is None else self.params[f"{key}{s}"][layer])
                        for s in ("_q", "_scale"))
            rows = quant.dequantize_rows if name.endswith("embedding") else quant.dequantize
            return np.asarray(rows(q, scale, quant.mode_of(q)))
        if key not in self.params:
            raise ConfigError(f"{self.path}: parameter {key} not found")
        arr = self.params[key]
        return np.asarray(arr if layer is None else arr[layer])


def _tokenizer_dir(path: Path) -> Path:
    """``PATH/tokenizer``; for a training step (``RUN_DIR/checkpoints/50``) the run's ``RUN_DIR/tokenizer``."""
    own = path / TOKENIZER_DIR
    run = path.parent.parent / TOKENIZER_DIR
    if not own.is_dir() and path.parent.name == "checkpoints" and run.is_dir():
        return run
    return own


def _to_device(tree: dict) -> dict:
    """Move leaves to the device one at a time, dropping each numpy copy (Orbax would copy the whole tree)."""
    import jax

    for k in list(tree):
        if isinstance(tree[k], dict):
            _to_device(tree[k])
        else:
            tree[k] = jax.device_put(tree.pop(k))
    return tree


def write_jaxllama(src: Source, dst: str | Path, quantize: str | None = None, group: int | None = None) -> Path:
    """A params-only jaxllama checkpoint (``save_params``) plus the source's tokenizer files;
    ``quantize`` int8/int4 stores the quantized tree (``group``: inputs per scale)."""
    import json

    from jaxllama.checkpoint import save_params

    tree = stacked_params(src)
    if quantize not in (None, "none"):
        from jaxllama.model import quant

        group = quant.DEFAULT_GROUP[quantize] if group is None else group
        tree = jax.tree.map(np.asarray, quant.quantize_tree(tree, quantize, group, embedding=True))
    with atomic_output(dst, is_file=True) as out:
        save_params(str(out), _to_device(tree), src.model_cfg)
        ex = src.extras
        tok = out / TOKENIZER_DIR
        tok.mkdir()
        copy_tokenizer_files(ex.tokenizer_dir, tok, TOKENIZER_FILES)
        if ex.chat_template and not (tok / "tokenizer_config.json").is_file():
            (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": ex.chat_template}, indent=2))
        gen = dict(ex.generation_config or {})
        for k, v in (("bos_token_id", ex.bos_token_id), ("eos_token_id", ex.eos_token_id)):
            if v is not None:
                gen.setdefault(k, v)
        if gen:
            (tok / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if not any(tok.iterdir()):
            tok.rmdir()
    return Path(dst)

