"""``jaxllama serve``: load a model as ``generate`` does, warm up the steps, serve HTTP with uvicorn.

The engine runs on its own thread (:meth:`Scheduler.run`); uvicorn's event loop answers requests.
With several processes, process 0 serves and schedules and the others follow its steps
(:func:`jaxllama.serve.executor.follow`). ``/health`` says ``ok`` only once the warm-up has
compiled the greedy prefill and decode steps, so the first real request does not pay for them.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Callable

import jax

from jaxllama.errors import ConfigError
from jaxllama.infer.generate import TextStops, load
from jaxllama.serve.executor import Executor, follow
from jaxllama.serve.scheduler import DEFAULT_SETTINGS, Scheduler, Sequence
from jaxllama.serve.slots import SlotProgram


@dataclasses.dataclass
class ServeOptions:
    model: str
    tokenizer: str | None = None
    mesh: str | None = None
    dtype: str | None = None
    lora: str | None = None
    rules: list | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 16
    max_len: int | None = None
    chunk: int = 128
    max_queue: int = 256
    names: tuple[str, ...] = ()
    chat_template: str = "auto"
    quantize: str | None = None
    group_size: int | None = None
    kv_cache_dtype: str = "auto"


def check(o: ServeOptions) -> None:
    for key, value, low in (("--slots", o.slots, 1), ("--chunk", o.chunk, 1), ("--max-queue", o.max_queue, 1),
                            ("--port", o.port, 0)):
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")
    if o.port > 65535:
        raise ConfigError(f"--port: must be <= 65535, got {o.port}")
    if o.max_len is not None and o.max_len < 2:
        raise ConfigError(f"--max-len: must be >= 2, got {o.max_len}")


def build(o: ServeOptions, say: Callable[[str], None] = lambda _: None):
    """Load the model and make the executor, the scheduler and (process 0) the app's service."""
    from jaxllama.serve.app import Service

    check(o)
    loaded = load(o.model, o.tokenizer, o.mesh, o.dtype, rules=o.rules, lora=o.lora, quantize=o.quantize,
                  group_size=o.group_size, kv_cache_dtype=o.kv_cache_dtype)
    eng = loaded.engine
    context = eng.arch.max_position
    max_len = min(o.max_len or context, context)
    chunk = min(o.chunk, max_len)
    max_len = -(-max_len // chunk) * chunk  # whole chunks: a chunk's write never runs past the cache
    slots = -(-o.slots // eng.layout.shards("activation_batch")) * eng.layout.shards("activation_batch")
    prog = SlotProgram(eng.arch, eng.layout, slots, max_len, chunk, eng.vocab_limit)
    ex = Executor(eng.params, prog)
    say(f"serve: {slots} slots x {max_len} positions, prompt chunks of {chunk}; KV cache "
        f"{prog.cache_bytes() / 2**20:,.0f} MiB ({'int8' if eng.arch.kv_cache_dtype == 'int8' else eng.arch.dtype})")
    sched = Scheduler(ex, o.max_queue)
    svc = Service(sched, loaded.tokenizer, list(o.names) or [o.model], loaded.chat_template, o.chat_template)
    return svc


def warm_up(svc, say: Callable[[str], None] = lambda _: None) -> None:
    """Compile the greedy steps for every attention window a request can reach (the scheduler is not
    running yet), so no request waits for a compilation; then one real request end to end."""
    import time

    import numpy as np

    from jaxllama.serve.slots import Flags, pack_rows, window

    t0 = time.perf_counter()
    ex, prog = svc.scheduler.ex, svc.scheduler.prog
    one = pack_rows([DEFAULT_SETTINGS])
    rows = pack_rows([DEFAULT_SETTINGS] * prog.slots)
    zeros = np.zeros((prog.chunk,), np.int32)
    seen_windows = set()
    for start in range(0, prog.max_len, prog.chunk):
        if window(prog, start + prog.chunk) not in seen_windows:
            seen_windows.add(window(prog, start + prog.chunk))
            ex.prefill(0, zeros, start, 0, zeros, *one, Flags())
    for w in sorted({window(prog, p + 1) for p in range(prog.max_len)}):
        positions = np.full((prog.slots,), w - 1, np.int32)
        ex.decode(np.zeros((prog.slots,), np.int32), positions, np.ones((prog.slots,), bool), *rows, Flags())
    sched = svc.scheduler
    seq = Sequence(prompt=[svc.tok.bos_id if svc.tok.bos_id is not None else 0], max_tokens=2,
                   settings=dict(DEFAULT_SETTINGS), stops=TextStops(svc.tok, []))
    sched.submit([seq])
    while seq.finish_reason is None:
        sched.step()
    sched.stats.clear()
    say(f"serve: compiled the steps for {len(seen_windows)} prefill and "
        f"{len({window(prog, p + 1) for p in range(prog.max_len)})} decode windows in {time.perf_counter() - t0:.1f}s")


def serve(o: ServeOptions, say: Callable[[str], None] | None = None) -> int:
    import uvicorn

    from jaxllama.serve.app import create_app

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    svc = build(o, say if jax.process_index() == 0 else (lambda _: None))
    if jax.process_index() != 0:
        follow(svc.scheduler.ex)
        return 0
    warm_up(svc, say)
    engine = threading.Thread(target=svc.scheduler.run, name="jaxllama-engine", daemon=True)
    engine.start()
    svc.ready = True
    config = uvicorn.Config(create_app(svc), host=o.host, port=o.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    say(f"serve: {', '.join(svc.names)} on http://{o.host}:{o.port}/v1 (OpenAI API; /health, /metrics)")
    try:
        server.run()
    finally:
        svc.scheduler.stop()
        engine.join(timeout=30)
    if not server.started:
        raise ConfigError(f"--port {o.port}: could not listen on {o.host}:{o.port} (in use?)")
    return 0
