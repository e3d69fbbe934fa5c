"""The OpenAI API's request bodies (validated) and response bodies, for completions and chat.

Requests are checked strictly (a string where a number belongs is an error, not a guess) and any
problem is an :class:`ApiError` whose message names the field; unknown fields are ignored, as vLLM
does (clients such as lm-evaluation-harness pass a task's extra generation settings through).
Extensions beyond OpenAI's fields, as vLLM names them: ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_TOP = 20  # OpenAI's limit on top_logprobs (completions' logprobs is 5 there; vLLM allows 20)


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off (vLLM uses -1)
    min_p: float = Field(0.0, ge=0, lt=1)
    n: int = Field(1, ge=1, le=64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise ApiError(400, f"stop: at most 16 stop strings, got {len(stops)}", "stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP)
    suffix: str | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP)
    max_completion_tokens: int | None = Field(None, ge=0)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict"}


def parse(raw: bytes, kind: type[_Request]) -> _Request:
    """The body as ``kind``, or a 400 naming the field (malformed JSON included)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # a union's member types appear in the location (prompt.list[int].3): keep fields and indices
        loc = [str(x) for x in err["loc"] if "[" not in str(x) and str(x) not in _TYPE_TAGS]
        param = ".".join(loc) or None
        value = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'))[:60]})"
        raise ApiError(400, f"{param or 'body'}: {err['msg']}{value}", param) from None


# -- responses --------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)


def envelope(rid: str, obj: str, model: str, choices: list, use: dict | None = None) -> dict:
    out: dict[str, Any] = dict(id=rid, object=obj, created=int(time.time()), model=model, choices=choices)
    if use is not None:
        out["usage"] = use
    return out


def completion_logprobs(strings: list[str], logprobs: list[float | None], tops: list[dict | None],
                        offset: int) -> dict:
    """The completions API's ``logprobs`` object (legacy OpenAI form, as lm-eval reads it)."""
    offsets, at = [], offset
    for s in strings:
        offsets.append(at)
        at += len(s)
    return dict(tokens=strings, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def chat_logprobs(strings: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]]) -> dict:
    """The chat API's ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    def entry(s: str, lp: float) -> dict:
        return dict(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

    return {"content": [dict(entry(s, lp), top_logprobs=[entry(t, v) for t, v in top])
                        for s, lp, top in zip(strings, logprobs, tops)]}


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")
