"""The HTTP side of ``jaxllama serve``: OpenAI's routes on FastAPI, over a :class:`Scheduler`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as Server-Sent Events ending in ``data: [DONE]``), ``GET /health``, ``GET /metrics``
(Prometheus text). A request becomes one :class:`Sequence` per prompt and choice; handlers wait on
an asyncio queue the engine thread feeds. A client that goes away (a closed stream, or a dropped
connection while waiting) cancels its sequences, which leave their slots at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from jaxllama.data.chat_format import chat_prompt
from jaxllama.infer.generate import TextStops
from jaxllama.serve import protocol as P
from jaxllama.serve.scheduler import InContext, QueueFull, Scheduler, Sequence

_SEED_MASK = 0x7FFFFFFF


class Service:
    """What the routes need: the scheduler, the tokenizer, the served names and limits."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, names: list[str], chat_template: str | None = None,
                 template: str = "auto"):
        self.scheduler, self.tok, self.names = scheduler, tokenizer, names
        self.chat_template, self.template = chat_template, template
        self.max_len = scheduler.prog.max_len
        self.stop_ids = frozenset(tokenizer.stop_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.requests: collections.Counter = collections.Counter()
        self.started = time.time()
        self.ready = False

    # -- requests -> sequences ----------------------------------------------------------------------

    def check_model(self, req: P._Request) -> str:
        if req.model is not None and req.model not in self.names:
            raise P.ApiError(400, f"model: {req.model!r} is not served here (served: {', '.join(self.names)})",
                             "model", "invalid_request_error")
        return req.model or self.names[0]

    def prompts(self, req: P.CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            items: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [p]
        else:
            items = list(p)
        if not items:
            raise P.ApiError(400, "prompt: must not be empty", "prompt")
        vocab = self.tok.vocab_size
        out = []
        for i, item in enumerate(items):
            ids = self.tok.encode(item) if isinstance(item, str) else list(item)
            if not ids:
                raise P.ApiError(400, f"prompt[{i}]: has no tokens", "prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise P.ApiError(400, f"prompt[{i}]: token id {bad[0]} is outside the vocabulary (size {vocab})",
                                 "prompt")
            out.append(ids)
        return out

    def chat_ids(self, req: P.ChatRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        text = chat_prompt(messages, self.tok, self.template, self.chat_template)
        return self.tok.encode(text, bos=False, special=True)

    def sequences(self, req: P._Request, prompts: list[list[int]], max_tokens: int | None, top: int,
                  score: bool) -> list[Sequence]:
        for i, ids in enumerate(prompts):
            if len(ids) >= self.max_len:
                raise P.ApiError(400, f"prompt{f'[{i}]' if len(prompts) > 1 else ''}: {len(ids)} tokens; the "
                                      f"server's context is {self.max_len} (--max-len), leaving no room to generate",
                                 "prompt")
        if len(prompts) * req.n > self.scheduler.max_queue:
            raise P.ApiError(400, f"n: {len(prompts)} prompt(s) x n={req.n} choices is more than the server queues "
                                  f"({self.scheduler.max_queue})", "n")
        stops = req.stop_strings()
        base_seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        top_k = 0 if req.top_k < 0 else req.top_k
        seqs = []
        for ids in prompts:
            for j in range(req.n):
                settings = dict(temperature=req.temperature, top_p=req.top_p, min_p=req.min_p,
                                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty, top_k=top_k,
                                seed=(base_seed * 1_000_003 + j) & _SEED_MASK)
                limit = self.max_len - len(ids) if max_tokens is None else max_tokens
                seqs.append(Sequence(prompt=ids, max_tokens=limit, settings=settings,
                                     stops=TextStops(InContext(self.tok, ids), stops),
                                     stop_ids=frozenset() if req.ignore_eos else self.stop_ids, top=top, score=score))
        return seqs

    # -- text of tokens ---------------------------------------------------------------------------------

    def strings(self, ids: list[int], context: list[int] = ()) -> list[str]:
        """Each token's text, as the difference of growing decodes (right for SentencePiece's spaces)."""
        out, before = [], self.tok.decode(list(context))
        seq = list(context)
        for t in ids:
            seq.append(t)
            now = self.tok.decode(seq)
            out.append(now[len(before):])
            before = now
        return out

    def token_text(self, token: int) -> str:
        """One token's text for an alternatives key; a piece that is not text alone (a byte of a UTF-8
        sequence) by its name, e.g. ``<0xE2>``, so distinct bytes stay distinct keys."""
        text = self.tok.decode([token])
        return self.tok.piece(token) if not text or "\ufffd" in text else text

    def alt(self, pairs: list[tuple[int, float]], chosen: int | None = None, chosen_lp: float | None = None) -> dict:
        """``{text: logprob}``, likeliest first; where two tokens share a text the likelier keeps it
        (so the maximum is the top token's, as lm-eval's greedy check reads it)."""
        d: dict = {}
        for t, v in pairs:
            d.setdefault(self.token_text(t), v)
        if chosen is not None:
            d.setdefault(self.token_text(chosen), chosen_lp)
        return d


def _run(seqs: list[Sequence], scheduler: Scheduler) -> asyncio.Queue:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    for i, s in enumerate(seqs):
        s.emit = (lambda idx: lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (idx, ev)))(i)
    scheduler.submit(seqs)
    return queue


async def _wait_all(seqs: list[Sequence], queue: asyncio.Queue, request: Request, scheduler: Scheduler) -> bool:
    """Until every sequence is final; False (and the sequences cancelled) if the client left."""
    left = len(seqs)
    while left:
        try:
            _, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                scheduler.cancel(seqs)
                return False
            continue
        left -= bool(ev["final"])
    return True


def create_app(svc: Service) -> FastAPI:
    app = FastAPI(title="jaxllama", docs_url=None, redoc_url=None)
    sched = svc.scheduler

    def error(e: P.ApiError) -> JSONResponse:
        svc.requests[str(e.status)] += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # noqa: ARG001
        return error(P.ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health():
        if not svc.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok", **{k: v for k, v in sched.load().items() if k in ("waiting", "running", "slots")}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [dict(id=n, object="model", created=int(svc.started), owned_by="jaxllama",
                                                max_model_len=svc.max_len) for n in svc.names]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(sched.load(), svc.requests), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            req = P.parse(await request.body(), P.CompletionRequest)
            model = svc.check_model(req)
            if req.suffix:
                raise P.ApiError(400, "suffix: not supported", "suffix")
            prompts = svc.prompts(req)
            want = req.logprobs is not None
            seqs = svc.sequences(req, prompts, req.max_tokens, req.logprobs or 0, score=want and req.echo)
            queue = _run(seqs, sched)
        except QueueFull as e:
            return error(P.ApiError(429, str(e)))
        except P.ApiError as e:
            return error(e)
        rid = P.new_id("cmpl")
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return _stream(svc, seqs, queue, rid, model, "text_completion", prompt_tokens, req, chat=False)
        if not await _wait_all(seqs, queue, request, sched):
            return Response(status_code=499)
        if any(s.error for s in seqs):
            return error(P.ApiError(500, f"generation failed: {next(s.error for s in seqs if s.error)}"))
        choices = []
        for i, s in enumerate(seqs):
            text = s.text()
            lp = None
            if want:
                lp = _completion_lp(svc, s, req.echo, req.logprobs or 0)
            if req.echo:
                text = svc.tok.decode(s.prompt) + text
            choices.append(dict(index=i, text=text, logprobs=lp, finish_reason=s.finish_reason))
        svc.requests["200"] += 1
        return JSONResponse(P.envelope(rid, "text_completion", model, choices,
                                       P.usage(prompt_tokens, sum(s.generated for s in seqs))))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            req = P.parse(await request.body(), P.ChatRequest)
            model = svc.check_model(req)
            ids = svc.chat_ids(req)
            top = (req.top_logprobs or 0) if req.logprobs else 0
            limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            seqs = svc.sequences(req, [ids], limit, top, score=False)
            queue = _run(seqs, sched)
        except QueueFull as e:
            return error(P.ApiError(429, str(e)))
        except P.ApiError as e:
            return error(e)
        rid = P.new_id("chatcmpl")
        if req.stream:
            return _stream(svc, seqs, queue, rid, model, "chat.completion.chunk", len(ids), req, chat=True)
        if not await _wait_all(seqs, queue, request, sched):
            return Response(status_code=499)
        if any(s.error for s in seqs):
            return error(P.ApiError(500, f"generation failed: {next(s.error for s in seqs if s.error)}"))
        choices = []
        for i, s in enumerate(seqs):
            lp = _chat_lp(svc, s, s.tokens, s.logprobs, s.tops, s.prompt) if req.logprobs else None
            choices.append(dict(index=i, message=dict(role="assistant", content=s.text()),
                                logprobs=lp, finish_reason=s.finish_reason))
        svc.requests["200"] += 1
        return JSONResponse(P.envelope(rid, "chat.completion", model, choices,
                                       P.usage(len(ids), sum(s.generated for s in seqs))))

    return app


def _completion_lp(svc: Service, s: Sequence, echo: bool, k: int) -> dict:
    tokens, lps, top_pairs = list(s.tokens), list(s.logprobs), list(s.tops or [[]] * len(s.tokens))
    if s.stop_token is not None:  # the EOS that ended it: scored, as vLLM and lm-eval expect
        tokens.append(s.stop_token[0])
        lps.append(s.stop_token[1])
        top_pairs.append(s.stop_token[2])
    strings = svc.strings(tokens, s.prompt)
    if s.stop_token is not None:
        strings[-1] = svc.token_text(s.stop_token[0])
    tops: list = [svc.alt(t, tok, lp) if k else {svc.token_text(tok): lp}
                  for t, tok, lp in zip(top_pairs, tokens, lps)]
    offset = len(svc.tok.decode(s.prompt))
    if echo:
        head = s.prompt[1:]
        prompt_tops = [svc.alt(t, tok, lp) if k else {svc.token_text(tok): lp}
                       for t, tok, lp in zip(s.prompt_tops or [[]] * len(head), head, s.prompt_logprobs)]
        strings = svc.strings(s.prompt) + strings
        lps = [None, *s.prompt_logprobs] + lps
        tops = [None, *prompt_tops] + tops
        offset = 0
    return P.completion_logprobs(strings, lps, tops, offset)


def _chat_lp(svc: Service, s: Sequence, tokens: list[int], logprobs: list[float], tops: list, context: list[int]):
    strings = svc.strings(tokens, context)
    alts = [[(svc.token_text(t), v) for t, v in pairs] for pairs in (tops or [[]] * len(tokens))]
    return P.chat_logprobs(strings, logprobs, alts)


def _stream(svc: Service, seqs: list[Sequence], queue: asyncio.Queue, rid: str, model: str, obj: str,
            prompt_tokens: int, req: P._Request, chat: bool) -> StreamingResponse:
    sched = svc.scheduler
    want_lp = bool(req.logprobs) if chat else req.logprobs is not None

    async def events() -> AsyncIterator[bytes]:
        done = 0
        shown = [0] * len(seqs)  # tokens already covered by a chunk's logprobs
        finished = False
        try:
            if chat:
                for i in range(len(seqs)):
                    yield P.sse(P.envelope(rid, obj, model, [dict(index=i, delta=dict(role="assistant", content=""),
                                                                  logprobs=None, finish_reason=None)]))
            elif getattr(req, "echo", False):
                for i, s in enumerate(seqs):
                    yield P.sse(P.envelope(rid, obj, model, [dict(index=i, text=svc.tok.decode(s.prompt),
                                                                  logprobs=None, finish_reason=None)]))
            while done < len(seqs):
                i, ev = await queue.get()
                s = seqs[i]
                if ev.get("error"):
                    svc.requests["500"] += 1
                    yield P.sse(P.ApiError(500, f"generation failed: {ev['error']}").body())
                    break
                n = len(s.tokens)
                lp = None
                if want_lp and n > shown[i]:
                    new = slice(shown[i], n)
                    ctx = s.prompt + s.tokens[:shown[i]]
                    if chat:
                        lp = _chat_lp(svc, s, s.tokens[new], s.logprobs[new], s.tops[new], ctx)
                    else:
                        lp = P.completion_logprobs(svc.strings(s.tokens[new], ctx), s.logprobs[new],
                                                   [{svc.token_text(t): v} for t, v in
                                                    zip(s.tokens[new], s.logprobs[new])], 0)
                    shown[i] = n
                if ev["text"] or ev["final"] or lp:
                    choice: dict = dict(index=i, logprobs=lp, finish_reason=ev["finish_reason"])
                    if chat:
                        choice["delta"] = {"content": ev["text"]} if ev["text"] or not ev["final"] else {}
                    else:
                        choice["text"] = ev["text"]
                    yield P.sse(P.envelope(rid, obj, model, [choice]))
                done += bool(ev["final"])
            if req.include_usage() and done == len(seqs):
                yield P.sse(P.envelope(rid, obj, model, [], P.usage(prompt_tokens, sum(s.generated for s in seqs))))
            yield P.sse("[DONE]")
            finished = True
            svc.requests["200"] += done == len(seqs)
        finally:
            if not finished:
                sched.cancel(seqs)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def prometheus(load: dict, requests: collections.Counter) -> str:
    """The /metrics page (Prometheus text format 0.0.4)."""
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP jaxllama_{name} {help_}", f"# TYPE jaxllama_{name} {kind}"])
        lines.extend(f"jaxllama_{name}{labels} {value}" for labels, value in samples)

    metric("requests_total", "counter", "HTTP requests answered, by status code",
           [(f'{{code="{code}"}}', n) for code, n in sorted(requests.items())] or [('{code="200"}', 0)])
    metric("queue_depth", "gauge", "sequences waiting for a slot", [("", load["waiting"])])
    metric("running_sequences", "gauge", "sequences in a slot", [("", load["running"])])
    metric("batch_occupancy", "gauge", "fraction of decode slots in use", [("", load["running"] / load["slots"])])
    metric("kv_cache_usage", "gauge", "fraction of KV-cache positions holding a running sequence's tokens",
           [("", round(load["kv_used"], 6))])
    metric("generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
           [("", round(load["tokens_per_s"], 3))])
    metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [("", load.get("prompt_tokens", 0))])
    metric("generation_tokens_total", "counter", "tokens generated", [("", load.get("completion_tokens", 0))])
    metric("sequences_cancelled_total", "counter", "sequences whose client went away",
           [("", load.get("cancelled", 0))])
    metric("requests_rejected_total", "counter", "requests refused with 429 (queue full)",
           [("", load.get("rejected", 0))])
    return "\n".join(lines) + "\n"
