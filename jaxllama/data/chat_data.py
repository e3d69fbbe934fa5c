"""Chat and instruction records -> token ids with an exact per-token loss mask.

``data.format=chat``: JSONL, one conversation per line, ``{"messages": [{"role", "content"}, ...]}``
(system / user / assistant, multi-turn). ``data.format=prompt_completion``: ``{"prompt", "completion"}``
(or ``"response"``); two strings are joined as plain text (BOS, prompt, completion, EOS: TRL's
"standard" format), message lists (or a string beside a list) go through the chat format.

A conversation is rendered by :mod:`jaxllama.data.chat_format` (the tokenizer's Jinja template, or the
Llama 3 / Llama 2 format, ``data.chat_template``) together with the character spans of its assistant
turns; the whole text is tokenized once with character offsets, and a token is trained when it
covers a character of a trained span (what transformers' ``return_assistant_tokens_mask`` computes).
``data.loss_on``: ``assistant`` (every assistant turn with its end-of-turn token; nothing of the
prompt or the generation header), ``last_assistant``, or ``all``.

A document longer than a row (``seq_len + 1`` tokens: ``seq_len`` input/target pairs) follows
``data.truncate``: ``right`` (keep the start: the default, as TRL and MaxText), ``left`` (keep the
end) or ``drop``; truncated and dropped documents are counted. A document with no trained target
left is a bad record (an error naming file:line, or skipped and counted with
``data.skip_bad_records``): training on it would teach nothing and hide the mistake. So is a line
longer than ``data.max_record_bytes`` (default 16 MiB), refused before it is parsed: one 50 MB line
would otherwise cost minutes and gigabytes to parse, render and tokenize.

Encoded documents travel through tf.data as bytes (int32 ids then uint8 mask), see :func:`pack_doc`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from jaxllama.config_checks import MAX_RECORD_BYTES, cut, short
from jaxllama.errors import ConfigError
from jaxllama.data.chat_format import ROLES, Rendered, render_chat, resolve_format

CHAT_FORMATS = ("chat", "prompt_completion")
LOSS_ON = ("assistant", "last_assistant", "all")
TRUNCATE = ("right", "left", "drop")


class BadRecord(ValueError):
    """A record that cannot become a training document (the reader reports it with file:line)."""


@dataclass
class ChatEncoder:
    """Turns one parsed JSONL record into ``(ids, mask)`` (or None when ``truncate=drop`` drops it)."""

    tok: Any
    fmt: str  # chat | prompt_completion
    loss_on: str = "assistant"
    template: str = "auto"
    truncate: str = "right"
    seq_len: int = 0  # 0: no length limit (inspection)
    add_bos: bool = True
    truncated: int = 0
    dropped: int = 0
    max_record_bytes: int = MAX_RECORD_BYTES  # a longer JSONL line is a BadRecord (see encode_line)

    def __post_init__(self):
        if self.fmt not in CHAT_FORMATS:
            raise ValueError(self.fmt)
        resolve_format(self.tok, self.template, key="data.chat_template")  # fail before reading anything

    def __call__(self, record: Any) -> tuple[np.ndarray, np.ndarray] | None:
        if not isinstance(record, dict):
            raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
        if self.fmt == "chat":
            if "messages" not in record:
                raise BadRecord("no key 'messages' (data.format=chat wants {\"messages\": [{\"role\", \"content\"}, ...]})")
            ids, mask = self._conversation(_messages(record["messages"], "messages"))
        else:
            ids, mask = self._prompt_completion(record)
        if self.loss_on == "all":
            mask = np.ones_like(mask)
        return self._fit(ids, mask)

    # -- rendering -----------------------------------------------------------------------------

    def _conversation(self, messages: list[dict], first: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``first``: assistant turns before it are context (a prompt_completion prompt's)."""
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("the conversation has no assistant message, so nothing would be trained")
        try:
            rendered = render_chat(messages, self.tok, self.template, add_generation_prompt=False,
                                   key="data.chat_template")
        except ConfigError as e:
            raise BadRecord(cut(str(e), 500)) from None
        if not rendered.spans:
            raise BadRecord("the chat template renders no assistant output ({% generation %} tags that are "
                            "never reached?), so nothing would be trained")
        spans = rendered.spans[-1:] if self.loss_on == "last_assistant" else rendered.spans[first:]
        rendered = Rendered(rendered.text, spans)
        return token_mask(self.tok, rendered, special=True)

    # -- transport (the reader thread -> the pipeline's packer) ------------------------------------

    @staticmethod
    def pack(doc: tuple[np.ndarray, np.ndarray]) -> bytes:
        return pack_doc(*doc)

    @staticmethod
    def unpack(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
        return unpack_doc(raw)

    @staticmethod
    def place(packer: Any, doc: tuple[np.ndarray, np.ndarray]) -> None:
        packer.add(*doc)

    def _prompt_completion(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        if "prompt" not in record:
            raise BadRecord("no key 'prompt' (data.format=prompt_completion wants \"prompt\" and \"completion\")")
        key = "completion" if "completion" in record else "response" if "response" in record else None
        if key is None:
            raise BadRecord("no key 'completion' (or 'response') beside 'prompt'")
        prompt, completion = record["prompt"], record[key]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise BadRecord(f"{key!r} is empty, so nothing would be trained")
            text = prompt + completion
            ids, mask = token_mask(self.tok, Rendered(text, [(len(prompt), len(text))]), special=False)
            head = [self.tok._need(self.tok.bos_id, "BOS")] if self.add_bos and self.tok.bos_id is not None else []
            eos = self.tok._need(self.tok.eos_id, "EOS")  # a completion ends: the model learns to stop
            return (np.concatenate([np.asarray(head, np.int32), ids, [eos]]).astype(np.int32),
                    np.concatenate([np.zeros(len(head), np.uint8), mask, [1]]).astype(np.uint8))
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        completion = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                      else _messages(completion, key))
        if not any(m["role"] == "assistant" for m in completion):
            raise BadRecord(f"{key!r} has no assistant message, so nothing would be trained")
        # only the completion is trained: assistant turns inside the prompt are context
        return self._conversation(prompt + completion, first=sum(m["role"] == "assistant" for m in prompt))

    # -- length --------------------------------------------------------------------------------

    def _fit(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        limit = self.seq_len + 1
        cut = bool(self.seq_len) and ids.size > limit
        if cut:
            if self.truncate == "drop":
                self.dropped += 1
                return None
            self.truncated += 1
            keep = slice(0, limit) if self.truncate == "right" else slice(ids.size - limit, None)
            ids, mask = ids[keep], mask[keep]
        if not mask[1:].any():  # the first token is never a target
            why = f" after data.truncate={self.truncate} to {limit} tokens" if cut else ""
            raise BadRecord(f"no trained tokens left{why} (the loss mask is empty)")
        return ids, mask


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{key!r} must be a non-empty list of {{\"role\", \"content\"}} messages")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord(f"{key}[{i}] must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise BadRecord(f"{key}[{i}]: unknown role {short(m['role'])} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise BadRecord(f"{key}[{i}]: content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def token_mask(tok: Any, rendered: Rendered, special: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``rendered.text`` and a 0/1 mask: 1 where a token covers a character of a span."""
    ids, starts, ends = tok.encode_offsets(rendered.text, special=special)
    covered = np.zeros(len(rendered.text) + 1, np.int64)
    for a, b in rendered.spans:
        covered[a] += 1
        covered[b] -= 1
    inside = np.concatenate([[0], np.cumsum(np.cumsum(covered)[:-1] > 0)])  # prefix count of trained chars
    s = np.asarray(starts, np.int64)
    e = np.maximum(np.asarray(ends, np.int64), s + 1).clip(max=len(rendered.text))
    s = s.clip(max=len(rendered.text))
    mask = (inside[e] - inside[s]) > 0
    return np.asarray(ids, np.int32), mask.astype(np.uint8)


def pack_doc(ids: np.ndarray, mask: np.ndarray) -> bytes:
    """An encoded document as one tf.string: int32 ids, then one mask byte per id."""
    return np.asarray(ids, "<i4").tobytes() + np.asarray(mask, np.uint8).tobytes()


def unpack_doc(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = len(raw) // 5
    return np.frombuffer(raw[: 4 * n], "<i4").astype(np.int32), np.frombuffer(raw[4 * n:], np.uint8).copy()


def encoder_for(d: Any, tok: Any) -> Any:
    """The encoder ``data.*`` describes (preference pairs: :mod:`jaxllama.data.preference`)."""
    if d.format == "preference":
        from jaxllama.data.preference import preference_encoder

        return preference_encoder(d, tok)
    return ChatEncoder(tok, d.format, d.loss_on, d.chat_template, d.truncate, d.seq_len,
                       tok.add_bos if d.add_bos is None else d.add_bos, max_record_bytes=d.max_record_bytes)


def oversized(text: str, limit: int) -> str | None:
    """Why a record of ``text`` is refused (more than ``limit`` bytes of UTF-8), or None. Exact, and
    cheap for the common case: a string of n characters has between n and 4n bytes."""
    if len(text) <= limit // 4:
        return None
    size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return None
    return (f"{'at least ' if len(text) > limit else ''}{size} bytes, larger than data.max_record_bytes={limit} "
            "(raise it for records this large)")


def encode_line(encoder: Callable, line: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One JSONL line -> (ids, mask); a problem is a :class:`BadRecord` with a one-line reason. A line
    over the encoder's ``max_record_bytes`` is refused before it is parsed."""
    why = oversized(line.rstrip("\r\n"), getattr(encoder, "max_record_bytes", MAX_RECORD_BYTES))
    if why:
        raise BadRecord(why)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"not valid JSON ({e.msg})") from None
    return encoder(record)


def show(tok: Any, ids: np.ndarray, mask: np.ndarray, color: bool = False) -> str:
    """A document as text with its trained tokens marked: ``[[...]]`` (or green on a terminal)."""
    out, trained, before = [], False, ""
    for n, m in enumerate(mask, 1):
        if bool(m) != trained:
            out.append(("\x1b[32m" if m else "\x1b[0m") if color else ("[[" if m else "]]"))
            trained = bool(m)
        text = tok.decode([int(i) for i in ids[:n]])  # by prefixes: a lone SentencePiece id loses its space
        out.append(text[len(before):] if text.startswith(before) else tok.piece(int(ids[n - 1])))
        before = text
    if trained:
        out.append("\x1b[0m" if color else "]]")
    return "".join(out)


def inspect_records(cfg: Any, count: int = 1, skip: int = 0, tokens: bool = False, color: bool = False) -> str:
    """``jaxllama data inspect``: the first ``count`` records after ``skip`` of ``data.source`` (files, in
    order, no shuffle), each as its text with the trained tokens marked, or (``tokens``) a table of
    id / piece / trained. Reads records in plain Python: no TensorFlow, no model."""
    from jaxllama.config import CHAT_FORMATS
    from jaxllama.data.corpus import BadRecords, SourceSpec, chat_records, read_documents, resolve_files
    from jaxllama.data.sources import open_tokenizer

    d = cfg.data
    spec = SourceSpec.parse(d.source)
    if spec.kind != "files":
        raise ConfigError(f"data.source={d.source}: data inspect reads files (a glob of JSONL or text files)")
    tok = open_tokenizer(cfg, spec.kind)
    enc = encoder_for(d, tok) if d.format in CHAT_FORMATS else None
    bad = BadRecords(skip=d.skip_bad_records)
    out: list[str] = []
    seen = 0
    for path in resolve_files(spec.pattern):
        records = chat_records(path, enc, bad) if enc else ((f"{path} document {i}", _plain(tok, d, text)) for i, text
                                                             in sized_documents(path, read_documents(
                                                                 path, d.format, d.text_key, bad), d, bad))
        for where, doc in records:
            if doc is None:
                out.append(f"== {where}: dropped (longer than data.seq_len + 1 and data.truncate=drop)")
                continue
            seen += 1
            if seen <= skip:
                continue
            if d.format == "preference":  # a pair: both sides, each with its trained tokens marked
                for side, (ids, mask) in zip(("chosen", "rejected"), doc):
                    out.append(f"== {where} {side}: {ids.size} tokens, {int(mask[1:].sum())} trained")
                    out.append(show(tok, ids, mask, color))
                if seen - skip >= count:
                    return "\n".join(out)
                continue
            ids, mask = doc
            out.append(f"== {where}: {ids.size} tokens, {int(mask[1:].sum())} trained (loss_on={d.loss_on}"
                       f"{', truncated' if enc and ids.size == d.seq_len + 1 and enc.truncated else ''})")
            if tokens:
                out += [f"{j:5d} {int(i):7d} {'T' if m else '.'} {tok.piece(int(i))!r}"
                        for j, (i, m) in enumerate(zip(ids, mask))]
            else:
                out.append(show(tok, ids, mask, color))
            if seen - skip >= count:
                return "\n".join(out)
    if seen <= skip:
        out.append(f"(no record after the first {skip})")
    return "\n".join(out)


def sized_documents(path: str, docs: Iterable[str], d: Any, bad: Any) -> Iterator[tuple[int, str]]:
    """(number, text) of a file's plain documents; one over ``data.max_record_bytes`` goes to ``bad``
    (an error, or skipped and counted) before it is tokenized. The reader yields documents, not lines,
    so the error names the document's number in the file (its line in a file without blank lines)."""
    for i, text in enumerate(docs, 1):
        why = oversized(text, d.max_record_bytes)
        if why:
            bad(f"{path}: document {i}", why)
            continue
        yield i, text


def _plain(tok: Any, d: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    bos = tok.add_bos if d.add_bos is None else d.add_bos
    eos = tok.add_eos if d.add_eos is None else d.add_eos
    ids = np.asarray(tok.encode(text, bos=bos, eos=eos), np.int32)
    return ids, np.ones(ids.size, np.uint8)
