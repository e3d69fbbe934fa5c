"""Hugging Face ``LlamaForCausalLM`` folders: read (safetensors, sharded or not, or ``*.bin``) and write.

``config.json`` is read in both the transformers 4.x style (``rope_theta`` + ``rope_scaling``) and
the 5.x style (``rope_parameters``); we write both sets of keys so either version loads the output.
Weights are written as sharded safetensors (``--shard-size``) with ``model.safetensors.index.json``,
one tensor in memory at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jaxllama.config import ModelConfig
from jaxllama.convert.common import (EMBED, HEAD, NORM, Extras, Source, atomic_output,
                                     copy_tokenizer_files, dtype_name, expected_shape, model_config)
from jaxllama.convert.hf_names import LAYER_KERNELS, LAYER_NORMS, hf_config
from jaxllama.convert.safetensors_io import SafetensorsFile, write_safetensors
from jaxllama.convert.validate import (canonical_shapes, check_layer_count, check_tensors, layer_indices,
                                       mapping_or_none, show)
from jaxllama.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")
_HF_LAYER = dict(LAYER_KERNELS + LAYER_NORMS)
LAYER_NAMES_FIRST = LAYER_KERNELS[0][0]  # the tensor named when a whole layer is missing
_UNSUPPORTED = {"attention_bias": True, "mlp_bias": True}


def hf_name(name: str, layer: int | None) -> str:
    if layer is not None:
        return f"model.layers.{layer}.{_HF_LAYER[name]}"
    return {EMBED: "model.embed_tokens.weight", NORM: "model.norm.weight", HEAD: "lm_head.weight"}[name]


def is_kernel(name: str) -> bool:
    return name.endswith("/kernel")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: invalid JSON ({str(e).splitlines()[0][:80]})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


# Our ModelConfig field -> config.json key, for error messages.
_HF_KEYS = dict(vocab_size="vocab_size", dim="hidden_size", ffn_dim="intermediate_size", n_layers="num_hidden_layers",
                n_heads="num_attention_heads", n_kv_heads="num_key_value_heads", head_dim="head_dim",
                max_position="max_position_embeddings", norm_eps="rms_norm_eps", rope_theta="rope_theta",
                tie_embeddings="tie_word_embeddings")
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def model_config_from_hf(cfg: dict, where: Path) -> ModelConfig:
    """Parse a Llama ``config.json`` (4.x or 5.x keys); refuse what our model cannot represent, and any
    value of the wrong type or range (one line naming the key)."""
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"{where}: model_type {show(cfg.get('model_type'))} is not supported (only 'llama')")
    for key, bad in _UNSUPPORTED.items():
        if cfg.get(key) == bad:
            raise ConfigError(f"{where}: {key}={json.dumps(bad)} is not supported by jaxllama's Llama")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {show(cfg['hidden_act'])} is not supported (only 'silu')")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise ConfigError(f"{where}: missing key {key}")
    rope = mapping_or_none(cfg.get("rope_parameters"), where, "rope_parameters")
    scaling = mapping_or_none(cfg.get("rope_scaling"), where, "rope_scaling")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    params, group = (rope, "rope_parameters") if rope.get("rope_type") else (scaling, "rope_scaling")
    keys = dict(_HF_KEYS, rope_theta="rope_parameters.rope_theta" if "rope_theta" in rope else "rope_theta")
    fields = dict(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], ffn_dim=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
        max_position=cfg.get("max_position_embeddings", 2048), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta, tie_embeddings=cfg.get("tie_word_embeddings", False))
    if kind == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in params:
                raise ConfigError(f"{where}: llama3 rope scaling lacks {k}")
        fields.update(rope_type="llama3", rope_factor=params["factor"], rope_low_freq_factor=params["low_freq_factor"],
                      rope_high_freq_factor=params["high_freq_factor"],
                      rope_original_max_position=params["original_max_position_embeddings"])
        keys.update(rope_factor=f"{group}.factor", rope_low_freq_factor=f"{group}.low_freq_factor",
                    rope_high_freq_factor=f"{group}.high_freq_factor",
                    rope_original_max_position=f"{group}.original_max_position_embeddings")
    elif kind != "default":
        raise ConfigError(f"{where}: rope type {show(kind)} is not supported (default or llama3)")
    return model_config(where, keys, **fields)


class _TorchBin:
    """``pytorch_model*.bin`` read with ``torch.load(weights_only=True, mmap=True)`` (never a plain unpickle)."""

    def __init__(self, path: Path):
        from jaxllama.convert.torch_io import load_state_dict

        self.path, self.state = path, load_state_dict(path)

    def keys(self):
        return list(self.state)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for k, v in self.state.items():
            if not hasattr(v, "shape"):
                raise ConfigError(f"{self.path}: {k} is a {type(v).__name__}, not a tensor")
            out[k] = tuple(v.shape)
        return out

    def get(self, name: str) -> np.ndarray:
        from jaxllama.convert.torch_io import to_numpy

        return to_numpy(self.state[name])


class HFSource(Source):
    """A Hugging Face folder, read lazily tensor by tensor."""

    def __init__(self, path: str | Path, dtype: np.dtype | None = None):
        self.path = Path(path)
        self.dtype = dtype
        cfg = _read_json(self.path / "config.json")
        try:
            self.model_cfg = model_config_from_hf(cfg, self.path / "config.json")
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.path / 'config.json'}: invalid value ({e})") from None
        self.files = self._weight_files()
        self.where_file: dict[str, object] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            for k, shape in f.shapes().items():
                self.where_file[k] = f
                shapes[k] = shape
        self._check_weights(shapes)
        gen = self.path / "generation_config.json"
        tok_cfg = self.path / "tokenizer_config.json"
        template = None
        if tok_cfg.is_file():
            template = _read_json(tok_cfg).get("chat_template")
        if template is None and (self.path / "chat_template.jinja").is_file():
            template = (self.path / "chat_template.jinja").read_text()
        has_tok = any((self.path / n).is_file() for n in TOKENIZER_FILES)
        self.extras = Extras(tokenizer_dir=self.path if has_tok else None, chat_template=template,
                             bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
                             generation_config=_read_json(gen) if gen.is_file() else None)

    def _check_weights(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """config.json must describe exactly the tensors the weight files hold (names, shapes, layer
        count) -- checked from the headers, before anything is read or allocated."""
        m = self.model_cfg
        names = [f.path.name for f in self.files]
        files = ", ".join(names) if len(names) <= 2 else f"{names[0]} .. {names[-1]}"
        check_layer_count(m.n_layers, layer_indices(shapes, LAYER_RE), self.path / "config.json",
                          "num_hidden_layers", files, lambda i: hf_name(LAYER_NAMES_FIRST, i))
        shape = canonical_shapes(m)
        expected = {hf_name(n, i): shape(n)[::-1] if is_kernel(n) else shape(n) for n, i in self.names()}
        check_tensors(expected, shapes, lambda k: f"{getattr(self.where_file.get(k), 'path', self.path)}: {k}",
                      f"{self.path} ({files})", ignore=lambda k: k.endswith("rotary_emb.inv_freq") or
                      (k == "lm_head.weight" and m.tie_embeddings))

    def _weight_files(self) -> list:
        p = self.path
        for index_name, opener in (("model.safetensors.index.json", SafetensorsFile),
                                   ("pytorch_model.bin.index.json", _TorchBin)):
            if (p / index_name).is_file():
                weight_map = _read_json(p / index_name).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ConfigError(f"{p / index_name}: missing key weight_map")
                names = sorted({n for n in weight_map.values() if isinstance(n, str)})
                if len(names) == 0 or not all(isinstance(n, str) for n in weight_map.values()):
                    raise ConfigError(f"{p / index_name}: weight_map must map tensor names to file names")
                for n in names:
                    if not (p / n).resolve().is_relative_to(p.resolve()):
                        raise ConfigError(f"{p / index_name}: lists {show(n)}, which is outside {p}")
                    if not (p / n).is_file():
                        raise ConfigError(f"{p / index_name}: lists {n}, which is missing from {p}")
                return [opener(p / n) for n in names]
        st = sorted(p.glob("*.safetensors"))
        if st:
            return [SafetensorsFile(f) for f in st]
        bins = sorted(p.glob("*.bin"))
        if bins:
            return [_TorchBin(f) for f in bins]
        raise ConfigError(f"{p}: no weights (*.safetensors or *.bin) beside config.json")

    def where(self, name: str, layer: int | None) -> str:
        key = hf_name(name, layer)
        f = self.where_file.get(key)
        return f"{f.path if f else self.path}: {key}"

    def _read(self, name: str, layer: int | None) -> np.ndarray:
        key = hf_name(name, layer)
        f = self.where_file.get(key)
        if f is None:
            raise ConfigError(f"{self.path}: tensor {key} not found in {', '.join(x.path.name for x in self.files)}")
        arr = f.get(key)
        if is_kernel(name):
            want = expected_shape(self.model_cfg, name)
            if tuple(arr.shape) != want[::-1]:
                raise ConfigError(f"{f.path}: {key}: shape {tuple(arr.shape)} does not match the config's "
                                  f"{want[::-1]}")
            arr = arr.T
        return arr


def write_hf(src: Source, dst: str | Path, shard_size: int = 5 * 2**30) -> Path:
    """Write ``src`` as a Hugging Face folder; at most ``shard_size`` bytes of weights per file."""
    m = src.model_cfg
    dt = src.stored_dtype()
    plan = [(hf_name(n, i), n, i, expected_shape(m, n)[::-1] if is_kernel(n) else expected_shape(m, n))
            for n, i in src.names()]
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = int(np.prod(item[3])) * dt.itemsize
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    with atomic_output(dst) as out:
        out.mkdir(exist_ok=True)
        lookup = {item[0]: item for item in plan}

        def produce(key: str) -> np.ndarray:
            _, n, i, _ = lookup[key]
            arr = src.get(n, i)
            return arr.T if is_kernel(n) else arr

        files = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        weight_map = {}
        for fname, shard in zip(files, shards):
            write_safetensors(out / fname, [(k, s, dt) for k, _, _, s in shard], produce)
            weight_map.update({k: fname for k, *_ in shard})
        if len(shards) > 1:
            total = sum(int(np.prod(s)) * dt.itemsize for *_, s in plan)
            (out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        ex = src.extras
        (out / "config.json").write_text(json.dumps(
            hf_config(m, dtype_name(dt), ex.bos_token_id, ex.eos_token_id), indent=2))
        copied = copy_tokenizer_files(ex.tokenizer_dir, out, TOKENIZER_FILES)
        if "tokenizer.model" in copied and "tokenizer.json" not in copied:
            from jaxllama.convert.gguf_vocab import add_tokenizer_json

            if add_tokenizer_json(out, m.vocab_size, ex.chat_template):  # Meta's Llama 3 tiktoken file
                copied = [*copied, "tokenizer.json", "tokenizer_config.json"]
        if ex.chat_template and "tokenizer_config.json" not in copied and "chat_template.jinja" not in copied:
            (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": ex.chat_template}, indent=2))
        gen = ex.generation_config
        if gen is None and (ex.bos_token_id is not None or ex.eos_token_id is not None):
            gen = {k: v for k, v in (("bos_token_id", ex.bos_token_id), ("eos_token_id", ex.eos_token_id))
                   if v is not None}
        if gen is not None:
            (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return Path(dst)

