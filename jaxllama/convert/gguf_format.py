"""GGUF (llama.cpp) files, both ways, with the ``gguf`` package.

llama.cpp's conventions: architecture ``llama``; tensors ``token_embd``, ``blk.N.attn_q`` ...,
``output_norm``, ``output`` stored ``[out, in]`` (GGUF lists dims reversed); q/k in Meta's
interleaved rotary layout (:func:`jaxllama.convert.common.permute_qk`); Llama 3.1 rope scaling as a
``rope_freqs`` tensor of per-frequency divisors (we also record the four llama3 constants under
``jaxllama.rope.*`` so a round trip is exact). Norms are always f32; 2-D weights take the chosen
type: f32, f16, bf16, or quantized q8_0, q4_0, q4_1, q5_0, q5_1 (``gguf.quants``' encoders), q6_k,
q4_k (every matrix Q4_K) and q4_k_m (llama.cpp's Q4_K_M mixture of Q4_K and Q6_K), the K-quants by
:mod:`jaxllama.convert.gguf_quants`. Per tensor the quantized kinds choose what llama.cpp's quantizer
would (the output matrix Q6_K, ...) and fall back as it does where rows are not whole blocks
(Q4_K -> Q5_0, Q6_K -> Q8_0, then f16). Export writes the header first and then one tensor at a
time; import memory-maps the file and dequantizes one tensor at a time (any type ``gguf.quants``
knows: Q8_0, Q4_0, Q4_1, K-quants...).
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from jaxllama.convert.common import (BF16, EMBED, HEAD, NORM, Extras, Source, atomic_output, canonical_names,
                                     check_shape, expected_shape, model_config, permute_qk)
from jaxllama.convert.gguf_vocab import files_from_vocab, read_vocab, vocab_from_files, write_vocab
from jaxllama.convert.tempdirs import make_owned_dir, sweep_stale
from jaxllama.convert.validate import canonical_shapes, check_layer_count, check_tensors, layer_indices, positive_int
from jaxllama.errors import ConfigError, first_line
from jaxllama.model.llama import Arch, rope_frequencies

_LAYER = {
    "self_attn/q_proj/kernel": "attn_q", "self_attn/k_proj/kernel": "attn_k", "self_attn/v_proj/kernel": "attn_v",
    "self_attn/o_proj/kernel": "attn_output", "mlp/gate_proj/kernel": "ffn_gate", "mlp/up_proj/kernel": "ffn_up",
    "mlp/down_proj/kernel": "ffn_down", "input_layernorm/scale": "attn_norm",
    "post_attention_layernorm/scale": "ffn_norm",
}
_GLOBAL = {EMBED: "token_embd", NORM: "output_norm", HEAD: "output"}
ROPE_FREQS = "rope_freqs.weight"
TOKENIZER_TMP = "jaxllama-gguf-tokenizer-"  # prefix of the temporary folder a GGUF's tokenizer is rebuilt in
LAYER_FIRST = "self_attn/q_proj/kernel"  # the tensor named when a whole block is missing
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


# --gguf-type -> (llama.cpp's file type, the GGML type of most 2-D tensors). Each quantized kind picks per
# tensor what `llama-quantize F32.gguf OUT.gguf TYPE` picks (see _choose), except q4_k: every 2-D tensor
# Q4_K (`llama-quantize --pure ... Q4_K_S`; llama.cpp's own Q4_K_S mixture needs Q5_K, which we do not make).
_KINDS = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
          "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q4_0": ("MOSTLY_Q4_0", "Q4_0"), "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
          "q5_0": ("MOSTLY_Q5_0", "Q5_0"), "q5_1": ("MOSTLY_Q5_1", "Q5_1"), "q4_k": ("MOSTLY_Q4_K_S", "Q4_K"),
          "q6_k": ("MOSTLY_Q6_K", "Q6_K"), "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K")}
# llama.cpp's tensor_type_fallback for rows that are not whole blocks; a type of 32-blocks that still does
# not fit becomes F16 (llama.cpp does the same after a fallback, but refuses Q8_0/Q4_0/... rows outright).
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def _ftype(gguf, kind: str):
    return gguf.LlamaFileType[_KINDS[kind][0]]


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _choose(gguf, kind: str, name: str, layer: int | None, m, row: int) -> str:
    """llama.cpp's llama_tensor_get_type for the llama architecture without an importance matrix: the
    output matrix (the token embedding too when tied, as the output then) Q6_K unless the file is Q8_0
    (Q8_0 if its rows are not whole blocks of the file's type); for Q4_K_M also Q6_K for attn_v and
    ffn_down in use_more_bits layers (llama.cpp counts attn_v tensors and ffn_down layers in layer
    order, which is this layer index). An untied token embedding keeps the file's type, as in llama.cpp.
    Not followed: llama.cpp raises a 70B model's (80 layers, GQA) Q4_K attn_v to Q5_K; ours stays Q4_K."""
    base = _KINDS[kind][1]
    if kind == "q4_k":
        return base
    if name == HEAD or (name == EMBED and m.tie_embeddings):
        if base == "Q8_0":
            return base
        return "Q8_0" if row % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[base]][0] else "Q6_K"
    if kind == "q4_k_m" and name in ("self_attn/v_proj/kernel", "mlp/down_proj/kernel") and \
            _more_bits(layer, m.n_layers):
        return "Q6_K"
    return base


def _qtype(gguf, shape: tuple[int, ...], kind: str, name: str = "", layer: int | None = None, m=None):
    """The GGML type of one tensor (GGUF shape, rows last): norms f32; f16/bf16 as asked; quantized kinds
    per :func:`_choose`, and a type whose blocks do not tile the rows falls back as in llama.cpp
    (Q4_K -> Q5_0, Q6_K -> Q8_0, then F16; Q8_0, Q4_0 ... -> F16)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or kind == "f32":
        return Q.F32
    if kind in ("f16", "bf16"):
        return Q.BF16 if kind == "bf16" else Q.F16
    t = _choose(gguf, kind, name, layer, m, shape[-1])
    if shape[-1] % gguf.GGML_QUANT_SIZES[Q[t]][0]:
        t = _FALLBACK.get(t, "F16")
        if t != "F16" and shape[-1] % gguf.GGML_QUANT_SIZES[Q[t]][0]:
            t = "F16"
    return Q[t]


def _encode(gguf, arr: np.ndarray, qtype, where: str = "tensor") -> np.ndarray:
    """The bytes (as an array) of one tensor in GGUF layout and type ``qtype``: K-quants by
    :mod:`jaxllama.convert.gguf_quants`, the other quantized types by ``gguf.quants``."""
    from jaxllama.convert.gguf_quants import quantize_q4_k, quantize_q6_k

    Q = gguf.GGMLQuantizationType
    arr32 = np.ascontiguousarray(arr, np.float32)
    if qtype == Q.Q4_K:
        return quantize_q4_k(arr32, where)
    if qtype == Q.Q6_K:
        return quantize_q6_k(arr32, where)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return arr32.astype({Q.F32: np.float32, Q.F16: np.float16, Q.BF16: BF16}[qtype])
    try:
        return gguf.quants.quantize(arr32, qtype)
    except NotImplementedError:
        raise ConfigError(f"{where}: the installed gguf package ({getattr(gguf, '__version__', '?')}) cannot "
                          f"quantize to {qtype.name}; upgrade it (pip install -U gguf)") from None


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
    """Write ``src`` as a llama.cpp GGUF file; ``kind`` one of ``_KINDS`` (f32, f16, bf16, q8_0, q4_0 ...
    q4_k_m; default: f32/f16/bf16 from the source dtype)."""
    gguf = _gguf()
    m = src.model_cfg
    if kind is None:
        dt = src.stored_dtype()
        kind = "bf16" if dt == BF16 else "f16" if dt == np.float16 else "f32"
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(Path(str(src.path)).name)
    w.add_file_type(_ftype(gguf, kind))
    if kind not in ("f32", "f16", "bf16"):
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
        qtype = _qtype(gguf, shape, kind, name, layer, m)
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
                w.write_tensor_data(_encode(gguf, _gguf_layout(src, name, layer), qtype, src.where(name, layer)))
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


_GGUF_KEYS = dict(vocab_size="llama.vocab_size", dim="llama.embedding_length", n_layers="llama.block_count",
                  n_heads="llama.attention.head_count", n_kv_heads="llama.attention.head_count_kv",
                  head_dim="llama.attention.key_length", ffn_dim="llama.feed_forward_length",
                  max_position="llama.context_length", norm_eps="llama.attention.layer_norm_rms_epsilon",
                  rope_theta="llama.rope.freq_base", rope_factor=_OURS + "factor",
                  rope_low_freq_factor=_OURS + "low_freq_factor", rope_high_freq_factor=_OURS + "high_freq_factor",
                  rope_original_max_position=_OURS + "original_context_length")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.")


def _check_counts(path: Path) -> None:
    """Bound the header's tensor and key counts by the file size before the reader loops over them
    (a tensor info takes at least 24 bytes, a key/value at least 12)."""
    with open(path, "rb") as f:
        head = f.read(24)
    size = path.stat().st_size
    if len(head) < 24:
        raise ConfigError(f"{path}: truncated or corrupt GGUF file ({size} bytes)")
    (version,) = struct.unpack("<I", head[4:8])
    order = ">" if version & 0xFFFF == 0 else "<"  # a big-endian file (as the gguf reader decides)
    n_tensors, n_kv = struct.unpack(order + "QQ", head[8:24])
    if n_tensors > size // 24 or n_kv > size // 12:
        raise ConfigError(f"{path}: corrupt GGUF header ({n_tensors} tensors and {n_kv} keys do not fit in "
                          f"{size} bytes)")


def _check_layout(path: Path, reader, gguf) -> None:
    """Every tensor's bytes are whole, in the file, and the tensors tile the data section (gaps and the
    tail under one alignment unit). A header whose tensor count is short parses, but leaves the last
    tensor's bytes unclaimed at the end of the file: refused here, not read as a tied head."""
    size, align = path.stat().st_size, int(reader.alignment)
    spans = []
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if not dims or dims[0] % block:
            raise ConfigError(f"{path}: {t.name}: dims {dims} do not fit {t.tensor_type.name} blocks of {block}")
        nbytes = math.prod(dims) // block * type_size
        if nbytes != int(t.n_bytes) or int(t.data_offset) + nbytes > size or t.data.nbytes != nbytes:
            raise ConfigError(f"{path}: truncated or corrupt GGUF file (tensor {t.name} needs {nbytes} bytes at "
                              f"offset {int(t.data_offset)} of {size})")
        spans.append((int(t.data_offset), int(t.data_offset) + nbytes, t.name))
    spans.sort()
    end, last = int(reader.data_offset), "the header"
    for start, stop, name in spans:
        if start < end:
            raise ConfigError(f"{path}: corrupt GGUF file (tensor {name} overlaps {last})")
        if start - end >= align:
            raise ConfigError(f"{path}: corrupt GGUF file ({start - end} unclaimed bytes before tensor {name})")
        end, last = stop, name
    if size - end >= align:
        raise ConfigError(f"{path}: corrupt GGUF file ({size - end} bytes after the last tensor: the header's "
                          f"tensor count ({len(spans)}) is short, or the file has data no tensor claims)")


class GGUFSource(Source):
    """A GGUF file, memory-mapped; quantized tensors are dequantized one at a time.

    The metadata is checked against the tensors actually in the file before anything is planned or
    allocated: the block count against the ``blk.N`` tensors present, every tensor's shape against
    the metadata, no tensor missing and none extra.
    """

    def __init__(self, path: str | Path, dtype: np.dtype | None = None):
        gguf = _gguf()
        self.path, self.dtype = Path(path), dtype
        try:
            _check_counts(self.path)
            self.reader = gguf.GGUFReader(self.path)
            self.tensors = {t.name: t for t in self.reader.tensors}
            _check_layout(self.path, self.reader, gguf)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the reader raises many kinds for damaged files
            msg = first_line(e, 100)
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
            # Owned (pid-stamped) so a process killed before its atexit cleanup has its folder removed by
            # the next process that opens a GGUF (tempdirs.sweep_stale).
            parent = Path(tempfile.gettempdir())
            sweep_stale(parent, TOKENIZER_TMP + "*")
            tmp = make_owned_dir(TOKENIZER_TMP, parent)
            try:
                files_from_vocab(vocab, tmp, template)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            ex.cleanup.append(tmp)
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
        n_layers = positive_int(self._key("block_count"), self.path, "llama.block_count")
        check_layer_count(n_layers, layer_indices(self.tensors, _BLOCK_RE), self.path, "llama.block_count",
                          "the file", lambda i: gguf_name(LAYER_FIRST, i))
        key_length = self._key("attention.key_length", None, False)
        embd = self.tensors["token_embd.weight"].shape
        fields = dict(
            vocab_size=self.fields.get("llama.vocab_size") or (int(embd[1]) if len(embd) == 2 else None),
            dim=self._key("embedding_length"), n_layers=n_layers, n_heads=self._key("attention.head_count"),
            n_kv_heads=self._key("attention.head_count_kv", None, False),
            head_dim=key_length if key_length is not None else self._key("rope.dimension_count", None, False),
            ffn_dim=self._key("feed_forward_length"), max_position=self._key("context_length", 4096),
            norm_eps=self._key("attention.layer_norm_rms_epsilon"), rope_theta=self._key("rope.freq_base", 10000.0),
            tie_embeddings="output.weight" not in self.tensors)
        if key_length is None:
            keys = dict(_GGUF_KEYS, head_dim="llama.rope.dimension_count")
        else:
            keys = _GGUF_KEYS
        m = model_config(self.path, keys, **fields)
        self._check_tensors(m)
        if ROPE_FREQS in self.tensors:
            fields.update(self._llama3(fields, keys))
            m = model_config(self.path, keys, **fields)
        return m

    def _check_tensors(self, m) -> None:
        """Exactly the tensors ``m`` implies, with its shapes (GGUF lists dims innermost first)."""
        shape = canonical_shapes(m)
        expected = {gguf_name(n, i): shape(n)[::-1] if n.endswith("/kernel") else shape(n)
                    for n, i in canonical_names(m)}
        if ROPE_FREQS in self.tensors:
            expected[ROPE_FREQS] = (m.head_dim // 2,)
        present = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self.tensors.items()}
        check_tensors(expected, present, lambda k: f"{self.path}: {k}", str(self.path))

    def _llama3(self, fields: dict, keys: dict) -> dict:
        """Recover the llama3 constants: from our keys, else Llama 3.1's published ones if they fit."""
        t = self.tensors[ROPE_FREQS]
        if t.tensor_type != _gguf().GGMLQuantizationType.F32:
            raise ConfigError(f"{self.path}: {ROPE_FREQS} is {t.tensor_type.name}, not F32")
        divisors = np.asarray(t.data, np.float32).reshape(-1)
        names = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
        ours = {k: self.fields.get(_OURS + k) for k in names}
        if ours["factor"] is not None:
            lacking = [_OURS + k for k in names if ours[k] is None]
            if lacking:
                raise ConfigError(f"{self.path}: missing metadata key {lacking[0]}")
            rope = dict(rope_factor=ours["factor"], rope_low_freq_factor=ours["low_freq_factor"],
                        rope_high_freq_factor=ours["high_freq_factor"],
                        rope_original_max_position=ours["original_context_length"])
        else:
            rope = dict(rope_factor=float(divisors.max()), rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_position=8192)
        trial = model_config(self.path, keys, **{**fields, "rope_type": "llama3", **rope})
        if not np.allclose(rope_divisors(trial), divisors, rtol=1e-4):
            raise ConfigError(f"{self.path}: {ROPE_FREQS} does not match llama3 rope scaling with {rope}")
        return dict(rope_type="llama3", rope_factor=trial.rope_factor, rope_low_freq_factor=trial.rope_low_freq_factor,
                    rope_high_freq_factor=trial.rope_high_freq_factor,
                    rope_original_max_position=trial.rope_original_max_position)

    def where(self, name: str, layer: int | None) -> str:
        return f"{self.path}: {gguf_name(name, layer)}"

    @property
    def quantized(self) -> bool:
        from jaxllama.convert.gguf_quantized import is_quantized

        return is_quantized([t.tensor_type.name for t in self.tensors.values() if len(t.shape) == 2])

    def quantized_tree(self) -> dict:
        """The weights as jaxllama's quantized tree (:mod:`jaxllama.convert.gguf_quantized`): Q8_0, Q4_0,
        Q5_0 and Q6_K blocks carry over as they are; other types are re-quantized to int8."""
        from jaxllama.convert import gguf_quantized as gq

        gguf, m = _gguf(), self.model_cfg

        def read(name: str, layer: int | None):
            if not (name.endswith("/kernel") or name == EMBED):
                return self.get(name, layer)
            t = self.tensors[gguf_name(name, layer)]
            d_in, out = int(t.shape[0]), int(t.shape[-1])
            if t.tensor_type.name in gq.FLOAT:
                w = self.get(name, layer)
                return gq.float_rows(w if name == EMBED else w.T)
            raw = np.fromfile(self.path, dtype=np.uint8, count=t.n_bytes, offset=t.data_offset).reshape(out, -1)
            q, s = gq.rows_of(raw, t.tensor_type.name, d_in, lambda r: gguf.quants.dequantize(r, t.tensor_type))
            if name in ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel"):
                heads = m.n_heads if "q_proj" in name else m.n_kv_heads
                perm = permute_qk(np.arange(out, dtype=np.float32)[None], heads, to_interleaved=False)[0]
                q, s = q[perm.astype(np.int64)], s[perm.astype(np.int64)]
            return q, s

        return gq.tree_of(read, list(canonical_names(m)), m.n_layers)

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
