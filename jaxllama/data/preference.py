"""Preference pairs (``data.format=preference``) -> a chosen and a rejected document, masked on the responses.

A JSONL record is ``{"prompt", "chosen", "rejected"}`` (each a string or a list of messages, as in
``prompt_completion``: two strings are plain text with BOS/EOS, message lists go through the chat
template), or ``{"chosen", "rejected"}`` conversations sharing a prefix, which is then the prompt
(TRL's "implicit prompt"). Each side is encoded like a ``prompt_completion`` record by
:class:`jaxllama.data.chat_data.ChatEncoder`: only the response is trained.

A pair always goes into one packed row (:meth:`jaxllama.data.packing.Packer.add_pair`), the chosen
sequence as segment ``2k + 1`` and the rejected one as ``2k + 2``: the loss recovers each sequence's
log-probability from ``segment_ids`` alone. A pair longer than a row is cut per ``data.truncate``:
``right``/``left`` cut each side to half a row (keeping its start / end), ``drop`` drops the pair;
counted either way. Identical or empty responses, a response cut away entirely, or a line over
``data.max_record_bytes`` are bad records (file:line, or skipped and counted with ``data.skip_bad_records``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxllama.config_checks import MAX_RECORD_BYTES
from jaxllama.data.chat_data import BadRecord, ChatEncoder, pack_doc, unpack_doc

Doc = tuple[np.ndarray, np.ndarray]


@dataclass
class PreferenceEncoder:
    """One parsed record -> ``(chosen, rejected)`` documents ``(ids, mask)``, or None when dropped."""

    chat: ChatEncoder  # format prompt_completion, no length limit: this class fits the pair into a row
    seq_len: int
    truncate: str = "right"
    truncated: int = 0
    dropped: int = 0
    max_record_bytes: int = MAX_RECORD_BYTES  # a longer JSONL line is a bad record (chat_data.encode_line)

    def __call__(self, record: Any) -> tuple[Doc, Doc] | None:
        if not isinstance(record, dict):
            raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
        for key in ("chosen", "rejected"):
            if key not in record:
                raise BadRecord(f"no key {key!r} (data.format=preference wants \"chosen\" and \"rejected\", "
                                "with \"prompt\" or conversations sharing a prefix)")
            if not record[key]:
                raise BadRecord(f"{key!r} is empty, so there is nothing to prefer")
        chosen, rejected = record["chosen"], record["rejected"]
        if "prompt" in record:
            prompt = record["prompt"]
        else:
            prompt, chosen, rejected = _shared_prefix(chosen, rejected)
        if chosen == rejected:
            raise BadRecord("'chosen' and 'rejected' are identical, so there is nothing to prefer")
        pair = tuple(self.chat({"prompt": prompt, "completion": side}) for side in (chosen, rejected))
        return self._fit(pair)

    def _fit(self, pair: tuple[Doc, Doc]) -> tuple[Doc, Doc] | None:
        if sum(ids.size - 1 for ids, _ in pair) <= self.seq_len:
            return pair
        if self.truncate == "drop":
            self.dropped += 1
            return None
        self.truncated += 1
        limit = self.seq_len // 2 + 1  # tokens per side: both sides' (input, target) pairs fit in one row
        out = []
        for (ids, mask), side in zip(pair, ("chosen", "rejected")):
            keep = slice(0, limit) if self.truncate == "right" else slice(max(ids.size - limit, 0), None)
            ids, mask = ids[keep], mask[keep]
            if not mask[1:].any():
                raise BadRecord(f"the {side} response is cut away by data.truncate={self.truncate} (each side gets "
                                f"{limit} tokens of a {self.seq_len}-token row); raise data.seq_len")
            out.append((ids, mask))
        return out[0], out[1]

    @staticmethod
    def pack(pair: tuple[Doc, Doc]) -> bytes:
        """A pair as one tf.string: the chosen document's byte length (int32), then both documents."""
        first = pack_doc(*pair[0])
        return np.asarray([len(first)], "<i4").tobytes() + first + pack_doc(*pair[1])

    @staticmethod
    def unpack(raw: bytes) -> tuple[Doc, Doc]:
        n = int(np.frombuffer(raw[:4], "<i4")[0])
        return unpack_doc(raw[4: 4 + n]), unpack_doc(raw[4 + n:])

    @staticmethod
    def place(packer: Any, pair: tuple[Doc, Doc]) -> None:
        packer.add_pair(*pair[0], *pair[1])


def _shared_prefix(chosen: Any, rejected: Any) -> tuple[list, list, list]:
    """Implicit prompt: the messages both conversations start with; the rest are the responses."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise BadRecord("no key 'prompt': give \"prompt\", or \"chosen\"/\"rejected\" as message lists that share "
                        "their first messages")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise BadRecord("no key 'prompt', and 'chosen' and 'rejected' share no first message to be the prompt")
    if n == len(chosen) or n == len(rejected):
        raise BadRecord("'chosen' and 'rejected' differ only in length: one has no response after the shared prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def preference_encoder(d: Any, tok: Any) -> PreferenceEncoder:
    """The encoder ``data.*`` describes (each side encoded as ``prompt_completion`` without a length limit)."""
    chat = ChatEncoder(tok, "prompt_completion", "assistant", d.chat_template, "right", 0,
                       tok.add_bos if d.add_bos is None else d.add_bos)
    return PreferenceEncoder(chat, d.seq_len, d.truncate, max_record_bytes=d.max_record_bytes)
