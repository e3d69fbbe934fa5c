"""GGUF (llama.cpp) files, both ways, with the ``gguf`` package.

llama.cpp's conventions: architecture ``llama``; tensors ``token_embd``, ``blk.N.attn_q`` ...,
``output_norm``, ``output`` stored ``[out, in]`` (GGUF lists dims reversed); q/k in Meta's
interleaved rotary layout (:func:`jaxllama.convert.common.permute_qk`); Llama 3.1 rope scaling as a
``rope_freqs`` tensor of per-frequency divisors (we also record the four llama3 constants under
``jaxllama.rope.*`` so a round trip is exact). Norms are always f32; 2-D weights take the chosen
type (f32, f16, bf16, q8_0; q8_0 rows not a multiple of 32 fall back to f16, as llama.cpp does).
Export writes the header first and then one tensor at a time; import memory-maps the file and
dequantizes one tensor at a time (any type ``gguf.quants`` knows: Q8_0, Q4_0, Q4_1, K-quants...).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from jaxllama.convert.common import (BF16, EMBED, HEAD, NORM, Extras, Source, atomic_output, check_shape,
                                     expected_shape, model_config, permute_qk)
from jaxllama.convert.gguf_vocab import files_from_vocab, read_vocab, vocab_from_files, write_vocab
from jaxllama.errors import ConfigError
from jaxllama.model.llama import Arch, rope_frequencies

_LAYER = {
    "self_attn/q_proj/kernel": "attn_q", "self_attn/k_proj/kernel": "attn_k", "self_attn/v_proj/kernel": "attn_v",
    "self_attn/o_proj/kernel": "attn_output", "mlp/gate_proj/kernel": "ffn_gate", "mlp/up_proj/kernel": "ffn_up",
    "mlp/down_proj/kernel": "ffn_down", "input_layernorm/scale": "attn_norm",
    "post_attention_layernorm/scale": "ffn_norm",
}
_GLOBAL = {EMBED: "token_embd", NORM: "output_norm", HEAD: "output"}
ROPE_FREQS = "rope_freqs.weight"
_OURS = "jaxllama.rope."  # extra keys: llama3 scaling constants (llama.cpp ignores unknown keys)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF conversion needs the gguf package (pip install gguf)") from None
    return gguf


def gguf_name(name: str, layer: int | None) -> str:
    return (f"blk.{layer}.{_LAYER[name]}" if layer is not None else _GLOBAL[name]) + ".weight"


def rope_divisors(m) -> np.ndarray:
    """llama.cpp's ``rope_freqs``: per-frequency divisors that turn plain RoPE into llama3-scaled RoPE."""
    plain = Arch(**{**_arch_args(m), "rope_type": "default"})
    return (rope_frequencies(plain).astype(np.float64) / rope_frequencies(Arch(**_arch_args(m)))).astype(np.float32)


def _arch_args(m) -> dict:
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_position",
            "norm_eps", "rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
            "rope_original_max_position", "tie_embeddings")
    return {k: getattr(m, k) for k in keys}


# ---- export ---------------------------------------------------------------------------------------------


def _ftype(gguf, kind: str):
    T = gguf.LlamaFileType
    return {"f32": T.ALL_F32, "f16": T.MOSTLY_F16, "bf16": T.MOSTLY_BF16, "q8_0": T.MOSTLY_Q8_0}[kind]


def _qtype(gguf, shape: tuple[int, ...], kind: str):
    """The GGML type of one tensor: norms f32; q8_0 needs rows of whole 32-blocks (else f16, like llama.cpp)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or kind == "f32":
        return Q.F32
    if kind == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return Q.BF16 if kind == "bf16" else Q.F16


def _encode(gguf, arr: np.ndarray, qtype) -> np.ndarray:
    """The bytes (as an array) of one tensor in GGUF layout and type ``qtype``."""
    Q = gguf.GGMLQuantizationType
    arr32 = np.ascontiguousarray(arr, np.float32)
    if qtype == Q.Q8_0:
        return gguf.quants.quantize(arr32, Q.Q8_0)
    return arr32.astype({Q.F32: np.float32, Q.F16: np.float16, Q.BF16: BF16}[qtype])


def _gguf_layout(src: Source, name: str, layer: int | None) -> np.ndarray:
    m = src.model_cfg
    arr = src.get(name, layer)
    if name in ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel"):
        arr = permute_qk(arr, m.n_heads if "q_proj" in name else m.n_kv_heads, to_interleaved=True)
    return arr.T if name.endswith("/kernel") else arr


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def write_gguf(src: Source, dst: str | Path, kind: str | None = None) -> Path:
    """Write ``src`` as a llama.cpp GGUF file; ``kind`` f32/f16/bf16/q8_0 (default: from the source dtype)."""
    gguf = _gguf()
    m = src.model_cfg
    if kind is None:
        dt = src.stored_dtype()
        kind = "bf16" if dt == BF16 else "f16" if dt == np.float16 else "f32"
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(Path(str(src.path)).name)
    w.add_file_type(_ftype(gguf, kind))
    if kind == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(m.max_position)
    w.add_embedding_length(m.dim)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(m.ffn_dim)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    w.add_rope_dimension_count(m.head_dim)
    w.add_rope_freq_base(m.rope_theta)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_vocab_size(m.vocab_size)
    if m.head_dim != m.dim // m.n_heads:
        w.add_key_length(m.head_dim)
        w.add_value_length(m.head_dim)
    if m.rope_type == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            w.add_float32(_OURS + k, getattr(m, f"rope_{k}"))
        w.add_uint32(_OURS + "original_context_length", m.rope_original_max_position)
    ex = src.extras
    vocab = vocab_from_files(ex.tokenizer_dir, m.vocab_size, ex.bos_token_id, ex.eos_token_id)
    if vocab is not None:
        write_vocab(w, vocab, ex.chat_template)

    # Plan every tensor's type and size (cheap: shapes only), then stream the data in the same order.
    plan = []
    for name, layer in src.names():
        shape = expected_shape(m, name)
        shape = shape[::-1] if name.endswith("/kernel") else shape
        qtype = _qtype(gguf, shape, kind)
        plan.append((name, layer, shape, qtype))
        w.add_tensor_info(gguf_name(name, layer), shape, np.dtype(np.float32), _nbytes(gguf, shape, qtype), qtype)
    if m.rope_type == "llama3":
        w.add_tensor_info(ROPE_FREQS, (m.head_dim // 2,), np.dtype(np.float32), 4 * (m.head_dim // 2),
                          gguf.GGMLQuantizationType.F32)
    with atomic_output(dst, is_file=True) as out:
        try:
            w.write_header_to_file(out)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for name, layer, shape, qtype in plan:
                w.write_tensor_data(_encode(gguf, _gguf_layout(src, name, layer), qtype))
            if m.rope_type == "llama3":
                w.write_tensor_data(rope_divisors(m))
        finally:
            w.close()
    return Path(dst)


# ---- import ---------------------------------------------------------------------------------------------


def _field(reader, key: str):
    f = reader.fields.get(key)
    value = None if f is None else f.contents()
    # GGUF floats are float32: take the shortest decimal that rounds to it (1e-05, not 9.99999974e-06).
    return float(str(np.float32(value))) if isinstance(value, float) else value


class GGUFSource(Source):
    """A GGUF file, memory-mapped; quantized tensors are dequantized one at a time."""

    def __init__(self, path: str | Path, dtype: np.dtype | None = None):
        gguf = _gguf()
        self.path, self.dtype = Path(path), dtype
        try:
            self.reader = gguf.GGUFReader(self.path)
            self.tensors = {t.name: t for t in self.reader.tensors}
            for t in self.reader.tensors:  # a truncated file maps fewer bytes than the header promises
                if t.data.nbytes != t.n_bytes:
                    raise ValueError(f"tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes")
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the reader raises many kinds for damaged files
            msg = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"{self.path}: truncated or corrupt GGUF file ({msg})") from None
        self.fields = {k: _field(self.reader, k) for k in self.reader.fields}
        try:
            self.model_cfg = self._config()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.path}: invalid llama.* metadata ({e})") from None
        vocab = read_vocab(self.fields)
        template = self.fields.get("tokenizer.chat_template")
        ex = Extras(chat_template=template)
        if vocab is not None:
            tmp = Path(tempfile.mkdtemp(prefix="jaxllama-gguf-tokenizer-"))
            ex.cleanup.append(tmp)
            files_from_vocab(vocab, tmp, template)
            ex.tokenizer_dir = tmp
            ex.bos_token_id, ex.eos_token_id = vocab.special.get("bos"), vocab.special.get("eos")
        self.extras = ex

    def _key(self, key: str, default=None, required: bool = True):
        value = self.fields.get(f"llama.{key}", default)
        if value is None and required:
            raise ConfigError(f"{self.path}: missing metadata key llama.{key}")
        return value

    def _config(self):
        arch = self.fields.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"{self.path}: general.architecture {arch!r} is not supported (only 'llama')")
        if "token_embd.weight" not in self.tensors:
            raise ConfigError(f"{self.path}: tensor token_embd.weight not found")
        dim, heads = int(self._key("embedding_length")), int(self._key("attention.head_count"))
        vocab = self.fields.get("llama.vocab_size") or int(self.tensors["token_embd.weight"].shape[1])
        fields = dict(
            vocab_size=int(vocab), dim=dim, n_layers=int(self._key("block_count")),
            n_heads=heads, n_kv_heads=int(self._key("attention.head_count_kv", heads)),
            head_dim=int(self._key("attention.key_length", None, False) or
                         self._key("rope.dimension_count", dim // heads)),
            ffn_dim=int(self._key("feed_forward_length")), max_position=int(self._key("context_length", 4096)),
            norm_eps=float(self._key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(self._key("rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in self.tensors)
        if ROPE_FREQS in self.tensors:
            fields.update(self._llama3(fields))
        return model_config(**fields)

    def _llama3(self, fields: dict) -> dict:
        """Recover the llama3 constants: from our keys, else Llama 3.1's published ones if they fit."""
        divisors = np.asarray(self.tensors[ROPE_FREQS].data, np.float32).reshape(-1)
        ours = {k: self.fields.get(_OURS + k) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                        "original_context_length")}
        if ours["factor"] is not None:
            rope = dict(rope_factor=float(ours["factor"]), rope_low_freq_factor=float(ours["low_freq_factor"]),
                        rope_high_freq_factor=float(ours["high_freq_factor"]),
                        rope_original_max_position=int(ours["original_context_length"]))
        else:
            rope = dict(rope_factor=float(divisors.max()), rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_position=8192)
        trial = model_config(**fields, rope_type="llama3", **rope)
        if not np.allclose(rope_divisors(trial), divisors, rtol=1e-4):
            raise ConfigError(f"{self.path}: {ROPE_FREQS} does not match llama3 rope scaling with {rope}")
        return dict(rope_type="llama3", **rope)

    def where(self, name: str, layer: int | None) -> str:
        return f"{self.path}: {gguf_name(name, layer)}"

    def _read(self, name: str, layer: int | None) -> np.ndarray:
        gguf = _gguf()
        key = gguf_name(name, layer)
        t = self.tensors.get(key)
        if t is None:
            raise ConfigError(f"{self.path}: tensor {key} not found")
        Q = gguf.GGMLQuantizationType
        # Read a private copy rather than touching the reader's map of the whole file: mapped pages
        # would stay resident (and counted) for the rest of the conversion.
        raw = np.fromfile(self.path, dtype=np.uint8, count=t.n_bytes, offset=t.data_offset)
        data = raw.view(t.data.dtype).reshape(t.data.shape)
        if t.tensor_type in (Q.F32, Q.F16):
            arr = data
        elif t.tensor_type == Q.BF16:
            arr = data.view(BF16)
        else:
            arr = gguf.quants.dequantize(data, t.tensor_type)
        m = self.model_cfg
        if name.endswith("/kernel"):
            arr = check_shape(arr, expected_shape(m, name)[::-1], self.where(name, layer)).T
            if name in ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel"):
                arr = permute_qk(arr, m.n_heads if "q_proj" in name else m.n_kv_heads, to_interleaved=False)
        return arr
