"""Llama tokenizers behind one interface: SentencePiece (Llama 1/2), Meta's tiktoken (Llama 3), HF tokenizer.json.

The pipeline, inference and evaluation code only see :class:`Tokenizer`; :func:`load_tokenizer` picks
the implementation by looking at the file, so a config names a path, never a kind. Importing this module
must not import TensorFlow (inference runs where TF is absent): :func:`tf_tokenize` imports it lazily.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxllama.data.tokenizer_train import cached_stdlib_tokenizer, train_sentencepiece  # noqa: F401 (API)
from jaxllama.errors import ConfigError, first_line

EXPECTED = ("a SentencePiece model, a Llama 3 tiktoken tokenizer.model (base64 token + rank per line), "
            "a Hugging Face tokenizer.json, or a folder holding tokenizer.json or tokenizer.model")

# Meta's Llama 3 pre-tokenizer (llama3/tokenizer.py) and its special tokens, named as in Llama 3.1+ (the
# 3.0 release names the same ids <|reserved_special_token_N|>; the ids and their roles are identical).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
_LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS = _LLAMA3_NAMED + [f"<|reserved_special_token_{2 + i}|>"
                                   for i in range(LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED))]
# Meta's encoder splits huge inputs so tiktoken's regex never sees pathological runs; we do the same.
_TIKTOKEN_MAX_CHARS = 400_000
_TIKTOKEN_MAX_RUN = 25_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_TIKTOKEN_MAX_RUN + 1, _TIKTOKEN_MAX_RUN + 1))
# Tokens that end a turn or a document in the Llama families (added to stop_ids when present).
_STOP_NAMES = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2}[ \t]+\d+\r?$")


class Tokenizer:
    """A loaded tokenizer. Subclasses implement ``_encode``, ``encode_batch``, ``decode``, ``_specials``.

    ``encode`` adds BOS/EOS by the family convention (``add_bos``/``add_eos``) unless told otherwise;
    ``encode_batch`` never does (it is the pipeline's fast path; the pipeline adds them itself).
    Special-token strings inside ordinary text are encoded as text unless ``special=True`` (for
    chat-template output, where ``<|eot_id|>`` must become the token).
    """

    kind: str = ""

    def __init__(self, path: str, vocab_size: int, bos_id: int | None, eos_id: int | None, pad_id: int,
                 stop_ids: frozenset[int], chat_template: str | None, add_bos: bool, add_eos: bool):
        self.path = path
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.add_eos = add_eos

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None, *,
               special: bool = False) -> list[int]:
        """Ids of ``text``; ``bos``/``eos`` None follow ``add_bos``/``add_eos``; ``special`` parses specials."""
        ids = self._encode(text, special)
        if self.add_bos if bos is None else bos:
            ids.insert(0, self._need(self.bos_id, "BOS"))
        if self.add_eos if eos is None else eos:
            ids.append(self._need(self.eos_id, "EOS"))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts, without BOS/EOS, using the library's parallel or batched path."""
        raise NotImplementedError

    def encode_offsets(self, text: str, special: bool = True) -> tuple[list[int], list[int], list[int]]:
        """(ids, start chars, end chars) of ``text`` without BOS/EOS: which characters each token covers,
        so a character span (an assistant turn) maps to exact tokens. The ids equal ``encode``'s."""
        ids, starts, ends = [], [], []
        for base, part, sid in _special_parts(text, self._parsed_specials() if special else {}):
            if sid is not None:
                ids.append(sid), starts.append(base), ends.append(base + len(part))
                continue
            i, s, e = self._offsets(part)
            ids += i
            starts += [base + x for x in s]
            ends += [base + x for x in e]
        return ids, starts, ends

    def _offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        raise NotImplementedError

    def _parsed_specials(self) -> dict[str, int]:
        """The special-token strings ``special=True`` turns into their ids."""
        return self._specials()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens are rendered as their strings, control pieces as nothing)."""
        raise NotImplementedError

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as the tokenizer spells it (``<s>``, ``<0xC3>``,
        ``▁wor``, ``Ġworld``): what ``tokenizer info`` shows, where decoding one id gives ``''`` or ``'�'``."""
        raise NotImplementedError

    def special_ids(self) -> dict[str, int]:
        """Name -> id of every special/control token (e.g. ``<|eot_id|>``, ``<s>``, ``<pad>``)."""
        return dict(self._specials())

    def _encode(self, text: str, special: bool) -> list[int]:
        raise NotImplementedError

    def _specials(self) -> dict[str, int]:
        raise NotImplementedError

    def _need(self, token_id: int | None, what: str) -> int:
        if token_id is None:
            raise ConfigError(f"tokenizer {self.path}: has no {what} token (set data.add_{what.lower()}=false)")
        return token_id


def _special_parts(text: str, specials: dict[str, int]) -> list[tuple[int, str, int | None]]:
    """``text`` cut at special-token strings (longest name first), for ``special=True``: (start char,
    the piece's text, its special id or None for plain text) per non-empty piece."""
    if not specials:
        return [(0, text, None)] if text else []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    out, pos = [], 0
    for i, part in enumerate(re.split(pattern, text)):
        if part:
            out.append((pos, part, specials[part] if i % 2 else None))
        pos += len(part)
    return out


def _split_on_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """``text`` as plain strings and special ids (:func:`_special_parts`)."""
    return [part if sid is None else sid for _, part, sid in _special_parts(text, specials)]


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 ``tokenizer.model`` (or one from ``jaxllama tokenizer train``): BOS on, EOS off by default."""

    kind = "sentencepiece"

    def __init__(self, path: str, add_bos: bool | None = None, add_eos: bool | None = None,
                 config: dict[str, Any] | None = None):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"tokenizer {path}: not a valid SentencePiece model ({first_line(e, 200)}); "
                              f"expected {EXPECTED}") from None
        sp, config = self._sp, config or {}
        bos, eos = _opt(sp.bos_id()), _opt(sp.eos_id())
        # A pad id is needed for padding rows even when the model has none (Llama 2 has none): the pad
        # positions are loss-masked, so <unk> (0), as MaxText uses, is as good as any.
        pad = _opt(sp.pad_id())
        pad = pad if pad is not None else (_opt(sp.unk_id()) or 0)
        self._control = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                         if sp.is_control(i) or sp.is_unknown(i)}
        super().__init__(path, sp.get_piece_size(), bos, eos, pad, frozenset(i for i in [eos] if i is not None),
                         _chat_template(config),
                         _flag(add_bos, config.get("add_bos_token"), bos is not None),
                         _flag(add_eos, config.get("add_eos_token"), False))

    def _encode(self, text: str, special: bool) -> list[int]:
        if not special:
            return self._sp.encode(text, out_type=int)
        out: list[int] = []
        for part in _split_on_specials(text, self._parsed_specials()):
            out.extend([part] if isinstance(part, int) else self._sp.encode(part, out_type=int))
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def _parsed_specials(self) -> dict[str, int]:
        return {k: v for k, v in self._control.items() if k != "<unk>"}

    def _offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        proto = self._sp.encode(text, return_type="proto")  # begin/end are byte offsets
        raw = text.encode("utf-8")
        char_at = np.zeros(len(raw) + 1, np.int64)  # byte offset -> character offset
        char_at[1:] = np.cumsum([(b & 0xC0) != 0x80 for b in raw])
        ps = list(proto.pieces)
        return [p.id for p in ps], [int(char_at[p.begin]) for p in ps], [int(char_at[p.end]) for p in ps]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def _specials(self) -> dict[str, int]:
        return self._control


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 ``tokenizer.model``: byte-level BPE ranks + the Llama 3 regex + 256 special tokens."""

    kind = "tiktoken"

    def __init__(self, path: str, add_bos: bool | None = None, add_eos: bool | None = None,
                 config: dict[str, Any] | None = None):
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        self._specials_map = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
        self._enc = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self._specials_map)
        s, config = self._specials_map, config or {}
        stop = frozenset(s[n] for n in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
        super().__init__(path, len(ranks) + LLAMA3_NUM_SPECIAL, s["<|begin_of_text|>"], s["<|end_of_text|>"],
                         s["<|finetune_right_pad_id|>"], stop, _chat_template(config),
                         _flag(add_bos, config.get("add_bos_token"), True),
                         _flag(add_eos, config.get("add_eos_token"), False))

    def _encode(self, text: str, special: bool) -> list[int]:
        allowed: Any = "all" if special else set()
        out: list[int] = []
        for chunk in _tiktoken_chunks(text):
            out.extend(self._enc.encode(chunk, allowed_special=allowed, disallowed_special=()))
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        chunks = [_tiktoken_chunks(t) if len(t) > _TIKTOKEN_MAX_RUN else [t] for t in texts]
        # tiktoken's threads release the GIL: ~1.3x over a loop on 2 cores.
        flat = iter(self._enc.encode_ordinary_batch([c for cs in chunks for c in cs],
                                                    num_threads=min(8, os.cpu_count() or 1)))
        out = []
        for cs in chunks:
            ids = next(flat)
            for _ in cs[1:]:
                ids = ids + next(flat)
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def _offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        ids = self._encode(text, False)
        _, starts = self._enc.decode_with_offsets(ids)
        return ids, list(starts), list(starts[1:]) + [len(text)]

    def piece(self, token_id: int) -> str:
        raw = self._enc.decode_single_token_bytes(int(token_id))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:  # a piece that is part of a character: its bytes
            return "".join(f"<0x{b:02X}>" for b in raw)

    def _specials(self) -> dict[str, int]:
        return self._specials_map


def _tiktoken_chunks(text: str) -> list[str]:
    """Meta's guard: pieces of at most 400k chars, cut every 25k chars inside longer (non-)whitespace runs."""
    out: list[str] = []
    for start in range(0, max(len(text), 1), _TIKTOKEN_MAX_CHARS):
        piece = text[start:start + _TIKTOKEN_MAX_CHARS]
        cuts = [m.start() + k for m in _LONG_RUN.finditer(piece)
                for k in range(_TIKTOKEN_MAX_RUN, m.end() - m.start(), _TIKTOKEN_MAX_RUN)]
        bounds = [0, *cuts, len(piece)]
        out.extend(piece[a:b] for a, b in zip(bounds, bounds[1:]))
    return out


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """The ``base64-token rank`` lines of a tiktoken file; a bad line is a ConfigError naming file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise ConfigError(f"{path}:{lineno}: not a tiktoken line (expected 'BASE64TOKEN RANK')") from None
            if token in ranks:
                raise ConfigError(f"{path}:{lineno}: token listed twice")
            ranks[token] = rank
    if not ranks:
        raise ConfigError(f"{path}: empty tiktoken file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{path}: tiktoken ranks must be 0..{len(ranks) - 1}, each once "
                          "(special tokens take the ids after them)")
    return ranks


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library, configured by tokenizer_config.json."""

    kind = "hf"

    def __init__(self, path: str, add_bos: bool | None = None, add_eos: bool | None = None,
                 config: dict[str, Any] | None = None, generation_config: dict[str, Any] | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = path
        try:
            self._tok = RustTokenizer.from_file(path)
            self._tok_special = RustTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise ConfigError(f"tokenizer {path}: not a valid tokenizer.json ({first_line(e, 200)})") from None
        self._tok.encode_special_tokens = True  # "<|eot_id|>" typed by a user is text, not the token
        config = config or {}
        added = self._tok.get_added_tokens_decoder()
        self._special_map = {t.content: i for i, t in added.items() if t.special}
        bos = self._token_id(config.get("bos_token"), ("<s>", "<|begin_of_text|>"))
        eos = self._token_id(config.get("eos_token"), ("</s>", "<|end_of_text|>"))
        pad = self._token_id(config.get("pad_token"), ("<|finetune_right_pad_id|>", "<pad>", "<unk>"))
        pad = pad if pad is not None else (eos if eos is not None else 0)
        stop = {eos} | {self._tok.token_to_id(n) for n in _STOP_NAMES}
        gen_eos = (generation_config or {}).get("eos_token_id")
        stop |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        # The post-processor says what HF adds around a document; tokenizer_config may say it explicitly.
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        post_bos = bos is not None and len(full) > len(plain) and full[0] == bos
        post_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
        if bos is not None:
            self._special_map.setdefault(self._tok.id_to_token(bos), bos)
        if eos is not None:
            self._special_map.setdefault(self._tok.id_to_token(eos), eos)
        super().__init__(path, self._tok.get_vocab_size(with_added_tokens=True), bos, eos, pad,
                         frozenset(i for i in stop if isinstance(i, int)), _chat_template(config),
                         _flag(add_bos, config.get("add_bos_token"), post_bos),
                         _flag(add_eos, config.get("add_eos_token"), post_eos))

    def _token_id(self, configured: Any, fallbacks: tuple[str, ...]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str):
            token_id = self._tok.token_to_id(configured)
            if token_id is None:
                raise ConfigError(f"tokenizer {self.path}: tokenizer_config.json names {configured!r}, "
                                  "which is not in tokenizer.json")
            return token_id
        for name in fallbacks:
            if (token_id := self._tok.token_to_id(name)) is not None:
                return token_id
        return None

    def _encode(self, text: str, special: bool) -> list[int]:
        tok = self._tok_special if special else self._tok
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_offsets(self, text: str, special: bool = True) -> tuple[list[int], list[int], list[int]]:
        enc = (self._tok_special if special else self._tok).encode(text, add_special_tokens=False)
        return list(enc.ids), [a for a, _ in enc.offsets], [b for _, b in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def _specials(self) -> dict[str, int]:
        return self._special_map


def _opt(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _flag(explicit: bool | None, configured: Any, default: bool) -> bool:
    """Caller's choice, else tokenizer_config.json's, else the family convention."""
    if explicit is not None:
        return bool(explicit)
    return bool(configured) if isinstance(configured, bool) else default


def _chat_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({first_line(e, 200)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _folder_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer_config.json (+ chat_template.jinja, transformers 5's separate file) and generation_config.json."""
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    jinja = folder / "chat_template.jinja"
    if "chat_template" not in config and jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    gen = folder / "generation_config.json"
    return config, (_read_json(gen) if gen.is_file() else {})


def sniff_kind(path: str) -> str:
    """``sentencepiece``, ``tiktoken`` or ``hf`` from a file's first bytes (ConfigError for empty/unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise ConfigError(f"tokenizer {path}: cannot read ({e.strerror}); expected {EXPECTED}") from None
    if not head.strip():
        raise ConfigError(f"tokenizer {path}: empty file; expected {EXPECTED}")
    if head.startswith(b"GGUF"):  # a whole llama.cpp model: its vocabulary is rebuilt by the converter
        raise ConfigError(f"tokenizer {path}: a GGUF model file, whose tokenizer generate, eval and convert read "
                          f"directly; to train with it, write its tokenizer files out first "
                          f"(jaxllama convert {path} DIR --to hf) and pass DIR")
    if head.lstrip().startswith(b"{"):
        return "hf"
    if _TIKTOKEN_LINE.match(head.lstrip().split(b"\n", 1)[0]):
        return "tiktoken"
    return "sentencepiece"


def load_tokenizer(path: str, add_bos: bool | None = None, add_eos: bool | None = None) -> Tokenizer:
    """Open ``path`` (a file or an HF-style folder) as the right :class:`Tokenizer`, detected by content.

    ``add_bos``/``add_eos`` override the family convention (SentencePiece and Llama 3: BOS on, EOS off;
    HF: tokenizer_config.json's ``add_bos_token``/``add_eos_token``, else what its post-processor adds).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"tokenizer {path}: no such file or directory; expected {EXPECTED}")
    config: dict[str, Any] = {}
    generation: dict[str, Any] = {}
    if p.is_dir():
        config, generation = _folder_config(p)
        if (p / "tokenizer.json").is_file():
            file = p / "tokenizer.json"
        elif (p / "tokenizer.model").is_file():
            file = p / "tokenizer.model"
        else:
            raise ConfigError(f"tokenizer {path}: folder holds neither tokenizer.json nor tokenizer.model")
    else:
        file = p
    kind = sniff_kind(str(file))
    if kind == "hf":
        if not p.is_dir():
            config, generation = _folder_config(p.parent)
        tok: Tokenizer = HFTokenizer(str(file), add_bos, add_eos, config, generation)
    elif kind == "tiktoken":
        tok = TiktokenTokenizer(str(file), add_bos, add_eos, config)
    else:
        tok = SentencePieceTokenizer(str(file), add_bos, add_eos, config)
    return tok


def tf_tokenize(tok: Tokenizer, bos: bool = False, eos: bool = False) -> Callable[[Any], Any]:
    """A tf.data map function: a batch (or scalar) of UTF-8 strings -> ``tf.RaggedTensor[int32]`` of ids.

    One ``tf.numpy_function`` call encodes the whole batch with the tokenizer's native batched encoder
    (SentencePiece/tokenizers/tiktoken run in C++/Rust), so the Python cost is per batch, not per
    document; benchmarks/tokenize_throughput.py measured it against tensorflow-text's SentencePiece op
    and per-element mapping (benchmarks/README.md). ``bos``/``eos`` add those ids around each document.
    """
    import tensorflow as tf

    head = [tok._need(tok.bos_id, "BOS")] if bos else []
    tail = [tok._need(tok.eos_id, "EOS")] if eos else []

    def encode(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        texts = []
        for i, raw in enumerate(batch.reshape(-1)):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:  # surfaces as tf.errors.InvalidArgumentError with this text
                raise ValueError(f"tf_tokenize: document {i} of the batch is not valid UTF-8 "
                                 f"({e.reason} at byte {e.start})") from None
        ids = tok.encode_batch(texts)
        if head or tail:
            ids = [head + x + tail for x in ids]
        splits = np.zeros(len(ids) + 1, np.int64)
        np.cumsum([len(x) for x in ids], out=splits[1:])
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(splits[-1]))
        return flat, splits

    def fn(texts: Any) -> Any:
        texts = tf.convert_to_tensor(texts, tf.string)
        scalar = texts.shape.rank == 0
        flat, splits = tf.numpy_function(encode, [tf.reshape(texts, [-1])], [tf.int32, tf.int64], stateful=False)
        flat.set_shape([None])
        splits.set_shape([None])
        ragged = tf.RaggedTensor.from_row_splits(flat, splits, validate=False)
        return ragged[0] if scalar else ragged

    return fn


SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def copy_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """Copy ``tok``'s files into ``folder`` (a run's ``tokenizer/``): the run becomes self-contained, so
    ``jaxllama generate RUN`` and ``jaxllama convert RUN`` find its tokenizer beside its checkpoints."""
    import shutil

    src = Path(tok.path)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, folder / ("tokenizer.json" if tok.kind == "hf" else "tokenizer.model"))
    if tok.kind == "hf":  # its configuration lives beside tokenizer.json; a .model file is complete alone
        for name in SIDE_FILES:
            if (src.parent / name).is_file():
                shutil.copyfile(src.parent / name, folder / name)
    elif tok.chat_template:  # a .model file read from a folder with a template: keep the template
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": tok.chat_template, "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos}, indent=2))


def describe_tokenizer(path: str, text: str | None = None) -> str:
    """``jaxllama tokenizer info``: kind, sizes, BOS/EOS/pad/stop ids, and optionally an encoded sample."""
    tok = load_tokenizer(path)
    specials = tok.special_ids()
    shown = ", ".join(f"{k}={v}" for k, v in list(specials.items())[:12])
    lines = [f"{tok.path}: {tok.kind}, vocab_size {tok.vocab_size}",
             f"bos_id {tok.bos_id}  eos_id {tok.eos_id}  pad_id {tok.pad_id}  stop_ids {sorted(tok.stop_ids)}",
             f"documents: add_bos={tok.add_bos} add_eos={tok.add_eos}; chat template: "
             f"{'yes' if tok.chat_template else 'none'}",
             f"special tokens ({len(specials)}): {shown}{' ...' if len(specials) > 12 else ''}"]
    if text is not None:
        ids = tok.encode(text)
        lines.append(f"ids ({len(ids)}): {ids}")
        lines.append(f"pieces: {[tok.piece(i) for i in ids]}")
    return "\n".join(lines)
