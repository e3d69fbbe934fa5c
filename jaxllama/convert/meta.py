"""Meta's consolidated checkpoints (``params.json`` + ``consolidated.NN.pth``), Llama 1/2/3, both ways.

Model-parallel shards are merged along each weight's own axis: column-parallel weights (wq, wk,
wv, w1, w3, output) on their output rows, row-parallel ones (wo, w2) on their input columns, the
embedding on its feature axis (Llama 1/2 ``ParallelEmbedding``) or its vocabulary axis (Llama 3
``VocabParallelEmbedding``), norms replicated. q/k use Meta's interleaved rotary layout and go
through :func:`jaxllama.convert.common.permute_qk`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jaxllama.config import ModelConfig
from jaxllama.convert.common import (EMBED, HEAD, NORM, Extras, Source, atomic_output, canonical_names,
                                     check_shape, expected_shape, model_config, permute_qk)
from jaxllama.convert.hf import _read_json as read_json
from jaxllama.convert.torch_io import load_state_dict, save_state_dict, to_numpy
from jaxllama.convert.validate import (boolean, canonical_shapes, check_layer_count, check_tensors, is_int,
                                       layer_indices, positive_int, positive_number)
from jaxllama.errors import ConfigError

_LAYER = {
    "self_attn/q_proj/kernel": ("attention.wq.weight", 0), "self_attn/k_proj/kernel": ("attention.wk.weight", 0),
    "self_attn/v_proj/kernel": ("attention.wv.weight", 0), "self_attn/o_proj/kernel": ("attention.wo.weight", 1),
    "mlp/gate_proj/kernel": ("feed_forward.w1.weight", 0), "mlp/up_proj/kernel": ("feed_forward.w3.weight", 0),
    "mlp/down_proj/kernel": ("feed_forward.w2.weight", 1),
    "input_layernorm/scale": ("attention_norm.weight", None), "post_attention_layernorm/scale": ("ffn_norm.weight", None),
}
_GLOBAL = {NORM: ("norm.weight", None), HEAD: ("output.weight", 0)}
# Meta's reference code hard-codes these for use_scaled_rope (Llama 3.1/3.2).
_META_ROPE = dict(rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192)


def meta_name(name: str, layer: int | None) -> str:
    if layer is not None:
        return f"layers.{layer}.{_LAYER[name][0]}"
    return "tok_embeddings.weight" if name == EMBED else _GLOBAL[name][0]


def meta_ffn_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Meta's FeedForward hidden size from params.json's multiple_of/ffn_dim_multiplier."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, ffn_dim: int) -> dict:
    """params.json keys that reproduce ``ffn_dim``: a published combination when one fits, else exact ones."""
    for mult, mo in ((None, 256), (1.3, 1024), (1.3, 4096), (1.2, 256), (1.5, 256), (1.3, 256), (None, 1)):
        if meta_ffn_dim(dim, mo, mult) == ffn_dim:
            return {"multiple_of": mo, **({"ffn_dim_multiplier": mult} if mult else {})}
    base = int(2 * (4 * dim) / 3)
    if base <= ffn_dim:
        return {"multiple_of": ffn_dim}
    return {"multiple_of": ffn_dim, "ffn_dim_multiplier": ffn_dim / base}


def _is_llama3(m: ModelConfig) -> bool:
    return m.vocab_size >= 100_000 or m.rope_theta >= 500_000 or m.rope_type == "llama3"


_META_KEYS = dict(vocab_size="vocab_size", dim="dim", n_layers="n_layers", n_heads="n_heads", n_kv_heads="n_kv_heads",
                  ffn_dim="multiple_of/ffn_dim_multiplier", max_position="max_seq_len", norm_eps="norm_eps",
                  rope_theta="rope_theta", rope_factor="rope_scaling_factor", head_dim="head size (wq rows / n_heads)",
                  **{k: k for k in _META_ROPE})
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def _split_axis(key: str) -> int | None | str:
    """The model-parallel axis a Meta tensor is split on (None: replicated), "embed" for the embedding
    (its axis depends on the Llama generation), "?" for a name Meta's Llama does not have."""
    if key == "tok_embeddings.weight":
        return "embed"
    for name, axis in list(_GLOBAL.values()) + list(_LAYER.values()):
        if key == name or (key.startswith("layers.") and key.split(".", 2)[-1] == name):
            return axis
    return "?"


class MetaSource(Source):
    """A Meta checkpoint folder; shards are memory-mapped and merged one tensor at a time.

    On open, before any tensor is read: params.json's values are checked (types, ranges), the shards
    must hold the same tensors whose shapes concatenate along each one's split axis, and the merged
    shapes and layer count must be exactly what params.json describes.
    """

    def __init__(self, path: str | Path, dtype: np.dtype | None = None):
        self.path, self.dtype = Path(path), dtype
        pj = self.path / "params.json"
        params = read_json(pj)
        files = sorted(self.path.glob("consolidated.*.pth"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
        if not files:
            raise ConfigError(f"{self.path}: no consolidated.NN.pth beside params.json")
        numbers = [int(re.findall(r"\d+", p.name)[-1]) for p in files]
        if numbers != list(range(len(files))):
            raise ConfigError(f"{self.path}: model-parallel shards {numbers} are not 00..{len(files) - 1:02d}")
        self.files = files
        # Keys and shapes only; tensors are re-opened per read (see _tensor), so mapped pages never pile up.
        self.shards = []
        for f in files:
            state = load_state_dict(f)
            shapes = {}
            for k, v in state.items():
                if not hasattr(v, "shape"):
                    raise ConfigError(f"{f}: {k} is a {type(v).__name__}, not a tensor")
                shapes[k] = tuple(int(d) for d in v.shape)
            self.shards.append(shapes)
            del state
        for f, s in zip(files[1:], self.shards[1:]):
            for k in sorted(set(self.shards[0]) ^ set(s)):
                lacking = f if k in self.shards[0] else files[0]
                raise ConfigError(f"{lacking}: tensor {k} not found (the other shards have it)")
        self.model_cfg = self._config(params, pj)
        m = self.model_cfg
        emb = self.shards[0]["tok_embeddings.weight"]
        self.embed_axis = 1 if len(self.shards) > 1 and emb[0] == m.vocab_size else 0
        merged = {k: self._merged_shape(k) for k in self.shards[0]}
        check_layer_count(m.n_layers, layer_indices(merged, _LAYER_RE), pj, "n_layers", self.files[0].name,
                          lambda i: meta_name("self_attn/q_proj/kernel", i))
        shape = canonical_shapes(m)
        expected = {meta_name(n, i): shape(n)[::-1] if n.endswith("/kernel") else shape(n)
                    for n, i in canonical_names(m)}
        names = {meta_name(n, i): (n, i) for n, i in canonical_names(m)}
        check_tensors(expected, merged, lambda k: self.where(*names[k]) if k in names else f"{self.files[0]}: {k}",
                      str(self.files[0]), ignore=lambda k: k.endswith("rope.freqs"))  # Llama 1's precomputed table
        tok = next((d / "tokenizer.model" for d in (self.path, self.path.parent) if (d / "tokenizer.model").is_file()),
                   None)
        self.extras = Extras(tokenizer_dir=tok.parent if tok else None)

    def _merged_shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` with the shards concatenated; shards that cannot concatenate are an error."""
        axis = _split_axis(key)
        axis = self.embed_axis if axis == "embed" else axis
        first = self.shards[0][key]
        if axis == "?" or len(self.shards) == 1:
            return first
        for f, s in zip(self.files[1:], self.shards[1:]):
            other = s[key]
            if axis is None and other != first:
                raise ConfigError(f"{f}: {key}: shape {other} differs from {self.files[0].name}'s {first} "
                                  f"(a replicated tensor)")
            if axis is not None and (len(other) != len(first) or len(first) <= axis or
                                     any(a != b for d, (a, b) in enumerate(zip(first, other)) if d != axis)):
                raise ConfigError(f"{f}: {key}: shape {other} does not concatenate with {self.files[0].name}'s "
                                  f"{first} along axis {axis}")
        if axis is None:
            return first
        return tuple(sum(s[key][axis] for s in self.shards) if d == axis else n for d, n in enumerate(first))

    def _config(self, p: dict, where: Path) -> ModelConfig:
        for key in ("dim", "n_layers", "n_heads"):
            if key not in p:
                raise ConfigError(f"{where}: missing key {key}")
        if "tok_embeddings.weight" not in self.shards[0]:
            raise ConfigError(f"{self.files[0]}: tensor tok_embeddings.weight not found")
        dim, heads = positive_int(p["dim"], where, "dim"), positive_int(p["n_heads"], where, "n_heads")
        vocab = p.get("vocab_size", -1)
        if vocab is None or (is_int(vocab) and vocab <= 0):  # Llama 1/2 write -1: the tokenizer decides
            vocab = self.shards[0]["tok_embeddings.weight"][0] if self.shards[0]["tok_embeddings.weight"] else None
        multiple_of = positive_int(p.get("multiple_of", 256), where, "multiple_of")
        multiplier = p.get("ffn_dim_multiplier")
        if multiplier is not None:
            multiplier = positive_number(multiplier, where, "ffn_dim_multiplier")
        wq = self.shards[0].get("layers.0.attention.wq.weight")
        head_dim = None
        if wq is not None and len(wq) == 2:
            rows = sum(s["layers.0.attention.wq.weight"][0] for s in self.shards)
            if rows % heads:
                raise ConfigError(f"{self.files[0]}: layers.0.attention.wq.weight has {rows} rows in all, not a "
                                  f"multiple of n_heads={heads} ({where.name})")
            head_dim = rows // heads
        fields = dict(vocab_size=vocab, dim=dim, n_layers=p["n_layers"], n_heads=heads,
                      n_kv_heads=p.get("n_kv_heads"), head_dim=head_dim,
                      ffn_dim=meta_ffn_dim(dim, multiple_of, multiplier),
                      norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
                      tie_embeddings="output.weight" not in self.shards[0])
        theta = positive_number(fields["rope_theta"], where, "rope_theta")
        scaled = boolean(p.get("use_scaled_rope", False), where, "use_scaled_rope")
        if scaled:
            fields.update(rope_type="llama3", rope_factor=p.get("rope_scaling_factor", 8.0))
            for k, v in _META_ROPE.items():
                fields[k] = p.get(k, v)
        default_ctx = 131072 if scaled else 8192 if theta >= 500_000 else 4096
        fields["max_position"] = p.get("max_seq_len", default_ctx)
        return model_config(where, _META_KEYS, **fields)

    def where(self, name: str, layer: int | None) -> str:
        files = self.files[0].name if len(self.files) == 1 else f"consolidated.00-{len(self.files) - 1:02d}.pth"
        return f"{self.path / files}: {meta_name(name, layer)}"

    def _merged(self, key: str, axis: int | None) -> np.ndarray:
        parts = []
        for f, s in zip(self.files, self.shards):
            if key not in s:
                raise ConfigError(f"{f}: tensor {key} not found")
            parts.append(_tensor(f, key))
            if axis is None:
                break
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)

    def _read(self, name: str, layer: int | None) -> np.ndarray:
        m = self.model_cfg
        key = meta_name(name, layer)
        if name == EMBED:
            return self._merged(key, self.embed_axis)
        _, axis = _LAYER[name] if layer is not None else _GLOBAL[name]
        arr = self._merged(key, axis)
        if name.endswith("/kernel"):
            arr = check_shape(arr, expected_shape(m, name)[::-1], self.where(name, layer)).T
            if name in ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel"):
                heads = m.n_heads if "q_proj" in name else m.n_kv_heads
                arr = permute_qk(arr, heads, to_interleaved=False)
        return arr


def _tensor(path: Path, key: str) -> np.ndarray:
    """One tensor, copied out of a freshly memory-mapped load (the map closes when ``state`` goes)."""
    state = load_state_dict(path)
    arr = np.array(to_numpy(state[key]))
    del state
    return arr


def meta_params_json(m: ModelConfig) -> dict:
    """params.json in Meta's key names; non-default llama3 rope constants are added as extra keys."""
    p = {"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
         "vocab_size": m.vocab_size, **ffn_params(m.dim, m.ffn_dim), "norm_eps": m.norm_eps,
         "rope_theta": m.rope_theta, "max_seq_len": m.max_position}
    if m.head_dim != m.dim // m.n_heads:
        p["head_dim"] = m.head_dim
    if m.rope_type == "llama3":
        p["use_scaled_rope"] = True
        p["rope_scaling_factor"] = m.rope_factor
        for k, v in _META_ROPE.items():
            if getattr(m, k) != v:
                p[k] = getattr(m, k)
    return p


def write_meta(src: Source, dst: str | Path, shards: int = 1) -> Path:
    """Write a Meta checkpoint split ``shards`` ways (model parallel), one shard in memory at a time."""
    m = src.model_cfg
    if shards < 1:
        raise ConfigError(f"--shards: must be >= 1, got {shards}")
    embed_axis = 0 if _is_llama3(m) else 1
    for what, size in (("n_kv_heads", m.n_kv_heads), ("ffn_dim", m.ffn_dim), ("dim", m.dim),
                       ("vocab_size" if embed_axis == 0 else "dim", m.vocab_size if embed_axis == 0 else m.dim)):
        if size % shards:
            raise ConfigError(f"--shards {shards} does not divide {what}={size}")
    with atomic_output(dst) as out:
        out.mkdir(exist_ok=True)
        for k in range(shards):
            state = {}
            for name, layer in src.names():
                arr = src.get(name, layer)
                if name.endswith("/kernel"):
                    if name in ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel"):
                        heads = m.n_heads if "q_proj" in name else m.n_kv_heads
                        arr = permute_qk(arr, heads, to_interleaved=True)
                    arr = arr.T
                axis = embed_axis if name == EMBED else (_LAYER[name] if layer is not None else _GLOBAL[name])[1]
                if axis is not None and shards > 1:
                    arr = np.split(arr, shards, axis=axis)[k]
                state[meta_name(name, layer)] = np.ascontiguousarray(arr)
            save_state_dict(state, out / f"consolidated.{k:02d}.pth")
            del state
        (out / "params.json").write_text(json.dumps(meta_params_json(m), indent=2))
        tok = src.extras.tokenizer_dir
        if tok is not None and (tok / "tokenizer.model").is_file():
            (out / "tokenizer.model").write_bytes((tok / "tokenizer.model").read_bytes())
    return Path(dst)
