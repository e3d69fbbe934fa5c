"""Tokenizers in GGUF: from Hugging Face/Meta tokenizer files into ``tokenizer.ggml.*``, and back.

Two llama.cpp vocab types: ``llama`` (SentencePiece: pieces, scores, token types, from a
``tokenizer.model``) and ``gpt2`` (byte-level BPE: tokens, merges, from a ``tokenizer.json``, e.g.
Llama 3). Reading a GGUF rebuilds the matching files (``tokenizer.model`` or ``tokenizer.json``,
plus ``tokenizer_config.json`` with the chat template) in a folder, so inference loads a GGUF's
tokenizer exactly as it loads a Hugging Face one.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from jaxllama.errors import ConfigError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Llama 3's pre-tokenizer split (llama.cpp calls it "llama-bpe").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class GGUFVocab:
    """The ``tokenizer.ggml.*`` fields."""

    model: str  # "llama" or "gpt2"
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None


def _pad(vocab: GGUFVocab, size: int, scores: bool) -> GGUFVocab:
    """Pad to the model's embedding rows with unused tokens, as llama.cpp's converter does."""
    for i in range(len(vocab.tokens), size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.token_types.append(UNUSED)
        if scores:
            vocab.scores.append(-1000.0)
    return vocab


def vocab_from_files(tok_dir: Path | None, vocab_size: int, bos: int | None, eos) -> GGUFVocab | None:
    """The GGUF vocab for the tokenizer files in ``tok_dir`` (``tokenizer.json`` preferred); None if none."""
    if tok_dir is None:
        return None
    if (tok_dir / "tokenizer.json").is_file():
        v = _from_tokenizer_json(tok_dir, vocab_size)
    elif (tok_dir / "tokenizer.model").is_file():
        from jaxllama.data.tokenizers import sniff_kind

        model_file = tok_dir / "tokenizer.model"
        if sniff_kind(str(model_file)) == "tiktoken":  # Meta's Llama 3 release
            v = _from_tiktoken(model_file, vocab_size)
        else:
            v = _from_sentencepiece(model_file, vocab_size)
        if v is None:
            return None
    else:
        return None
    if bos is not None:
        v.special.setdefault("bos", bos)
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if eos is not None:
        v.special.setdefault("eos", eos)
    return v


def _from_tokenizer_json(tok_dir: Path, vocab_size: int) -> GGUFVocab:
    path = tok_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text())
        model = tj["model"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a tokenizers JSON file ({e})") from None
    if model.get("type") != "BPE":
        raise ConfigError(f"{path}: model type {model.get('type')!r} cannot go into GGUF (only BPE)")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    n = max(vocab_size, max(by_id) + 1)
    if n > vocab_size:
        raise ConfigError(f"{path}: {n} tokens but the model has vocab_size={vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    token_types = [types.get(i, NORMAL if i in by_id else UNUSED) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre_json = json.dumps(tj.get("pre_tokenizer"))
    pre = "llama-bpe" if "\\\\p{N}{1,3}" in pre_json or r"\p{N}{1,3}" in pre_json else "gpt-2"
    v = GGUFVocab(model="gpt2", tokens=tokens, token_types=token_types, merges=merges, pre=pre)
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    for key in ("bos", "eos", "unk", "pad"):
        tok = cfg.get(f"{key}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in ids:
            v.special[key] = ids[tok]
    post = json.dumps(tj.get("post_processor"))
    bos_tok = tokens[v.special["bos"]] if "bos" in v.special else None
    v.add_bos = bool(cfg.get("add_bos_token", bos_tok is not None and json.dumps(bos_tok) in post))
    v.add_eos = bool(cfg.get("add_eos_token", False))
    return v


def _from_sentencepiece(path: Path, vocab_size: int) -> GGUFVocab | None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError):
        print(f"jaxllama: warning: {path} is not a SentencePiece model (Llama 3's tiktoken file?); "
              f"the GGUF gets no tokenizer", file=sys.stderr)
        return None
    n = sp.GetPieceSize()
    if n > vocab_size:
        raise ConfigError(f"{path}: {n} pieces but the model has vocab_size={vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        types.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else BYTE if sp.IsByte(i)
                     else UNUSED if sp.IsUnused(i) else NORMAL)
    v = GGUFVocab(model="llama", tokens=tokens, token_types=types, scores=scores, add_bos=True, add_eos=False)
    for key, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id())):
        if i >= 0:
            v.special[key] = i
    return _pad(v, vocab_size, scores=True)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are shifted past 255,
    so every byte string becomes a printable token string (how ``gpt2`` GGUF vocabs spell tokens)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts whose merge made ``token``: replay BPE on its bytes with only lower-ranked merges."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
        if ranks.get(parts[best] + parts[best + 1], rank) >= rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ConfigError(f"tiktoken token of rank {rank} cannot be built from lower-ranked tokens")
    return parts[0], parts[1]


def _from_tiktoken(path: Path, vocab_size: int) -> GGUFVocab:
    """Meta's Llama 3 ``tokenizer.model`` (tiktoken ranks + the 256 special tokens after them) as a
    ``gpt2``/``llama-bpe`` vocab: tokens spelled in the byte-level alphabet, merges recovered by BPE."""
    from jaxllama.data.tokenizers import LLAMA3_SPECIALS, read_tiktoken_ranks

    ranks = read_tiktoken_ranks(str(path))
    n = len(ranks) + len(LLAMA3_SPECIALS)
    if n > vocab_size:
        raise ConfigError(f"{path}: {n} tokens (with Llama 3's special tokens) but the model has "
                          f"vocab_size={vocab_size}")
    u = byte_to_unicode()
    spell = lambda b: "".join(u[x] for x in b)  # noqa: E731
    by_rank = sorted(ranks, key=ranks.__getitem__)
    merges = [" ".join(map(spell, _merge_of(t, ranks[t], ranks))) for t in by_rank if len(t) > 1]
    tokens = [spell(t) for t in by_rank] + list(LLAMA3_SPECIALS)
    types = [NORMAL] * len(ranks) + [CONTROL] * len(LLAMA3_SPECIALS)
    ids = {t: i for i, t in enumerate(tokens)}
    v = GGUFVocab(model="gpt2", tokens=tokens, token_types=types, merges=merges, pre="llama-bpe",
                  special={"bos": ids["<|begin_of_text|>"], "eos": ids["<|end_of_text|>"]}, add_bos=True,
                  add_eos=False)
    return _pad(v, vocab_size, scores=False)


def add_tokenizer_json(folder: Path, vocab_size: int, chat_template: str | None) -> bool:
    """Beside a Meta Llama 3 ``tokenizer.model`` (tiktoken), write the ``tokenizer.json`` transformers
    loads (and a ``tokenizer_config.json`` if there is none). False when the model file is not tiktoken."""
    from jaxllama.data.tokenizers import sniff_kind

    model_file = folder / "tokenizer.model"
    if not model_file.is_file() or sniff_kind(str(model_file)) != "tiktoken":
        return False
    v = _from_tiktoken(model_file, vocab_size)
    if (folder / "tokenizer_config.json").is_file():
        _write_tokenizer_json(v, folder / "tokenizer.json")
    else:
        files_from_vocab(v, folder, chat_template)
    return True


def write_vocab(writer, v: GGUFVocab, chat_template: str | None) -> None:
    """Add the ``tokenizer.ggml.*`` keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(v.model)
    if v.pre:
        writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    if v.merges:
        writer.add_token_merges(v.merges)
    add = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
           "pad": writer.add_pad_token_id}
    for key, i in v.special.items():
        add[key](i)
    if v.add_bos is not None:
        writer.add_add_bos_token(v.add_bos)
    if v.add_eos is not None:
        writer.add_add_eos_token(v.add_eos)
    if chat_template:
        writer.add_chat_template(chat_template)


def read_vocab(fields: dict) -> GGUFVocab | None:
    """The vocab stored in a GGUF file (``fields``: key -> python value), or None."""
    model = fields.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in fields:
        return None
    n = len(fields["tokenizer.ggml.tokens"])
    v = GGUFVocab(model=model, tokens=list(fields["tokenizer.ggml.tokens"]),
                  token_types=list(fields.get("tokenizer.ggml.token_type", [NORMAL] * n)),
                  scores=fields.get("tokenizer.ggml.scores"), merges=fields.get("tokenizer.ggml.merges"),
                  pre=fields.get("tokenizer.ggml.pre"), add_bos=fields.get("tokenizer.ggml.add_bos_token"),
                  add_eos=fields.get("tokenizer.ggml.add_eos_token"),
                  add_space_prefix=fields.get("tokenizer.ggml.add_space_prefix"))
    for key in ("bos", "eos", "unk", "pad"):
        if f"tokenizer.ggml.{key}_token_id" in fields:
            v.special[key] = int(fields[f"tokenizer.ggml.{key}_token_id"])
    return v


def files_from_vocab(v: GGUFVocab, out: Path, chat_template: str | None) -> None:
    """Write ``tokenizer.model`` (llama) or ``tokenizer.json`` (gpt2) and ``tokenizer_config.json`` to ``out``."""
    if v.model == "llama":
        _write_sentencepiece(v, out / "tokenizer.model")
    elif v.model == "gpt2":
        _write_tokenizer_json(v, out / "tokenizer.json")
    else:
        raise ConfigError(f"GGUF tokenizer model {v.model!r} is not supported (llama or gpt2)")
    cfg: dict = {"add_bos_token": bool(v.add_bos), "add_eos_token": bool(v.add_eos)}
    if v.model == "gpt2":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key, i in v.special.items():
        cfg[f"{key}_token"] = v.tokens[i]
    if chat_template:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _write_sentencepiece(v: GGUFVocab, path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    kinds = {NORMAL: m.SentencePiece.NORMAL, UNKNOWN: m.SentencePiece.UNKNOWN, CONTROL: m.SentencePiece.CONTROL,
             USER_DEFINED: m.SentencePiece.USER_DEFINED, UNUSED: m.SentencePiece.UNUSED, BYTE: m.SentencePiece.BYTE}
    scores = v.scores or [0.0] * len(v.tokens)
    for tok, score, kind in zip(v.tokens, scores, v.token_types):
        m.pieces.add(piece=tok, score=float(score), type=kinds.get(int(kind), m.SentencePiece.NORMAL))
    t = m.trainer_spec
    t.model_type = t.BPE
    t.vocab_size = len(v.tokens)
    t.byte_fallback = BYTE in v.token_types
    t.unk_id = v.special.get("unk", 0)
    t.bos_id = v.special.get("bos", -1)
    t.eos_id = v.special.get("eos", -1)
    t.pad_id = v.special.get("pad", -1)
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True if v.add_space_prefix is None else bool(v.add_space_prefix)
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    path.write_bytes(m.SerializeToString())


def _write_tokenizer_json(v: GGUFVocab, path: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    keep = [i for i, t in enumerate(v.token_types) if t != UNUSED]
    vocab = {v.tokens[i]: i for i in keep}
    merges = [tuple(m.split(" ", 1)) for m in (v.merges or [])]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=v.pre == "llama-bpe"))
    if v.pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(v.tokens[i], special=True, normalized=False)
               for i, t in enumerate(v.token_types) if t == CONTROL]
    user = [AddedToken(v.tokens[i], special=False, normalized=False)
            for i, t in enumerate(v.token_types) if t == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if v.add_bos and "bos" in v.special:
        b = v.tokens[v.special["bos"]]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, v.special["bos"])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(path))
