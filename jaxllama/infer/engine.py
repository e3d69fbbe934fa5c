"""Batched generation: one prefill forward pass, then a jitted ``lax.while_loop`` over a KV cache.

Rows are right-padded prompts; cache slot ``j`` of a row holds its position ``j``, so rows of
different lengths advance independently (each decode step writes every row at its own position and
attends to slots up to it). The decode loop runs in chunks of ``chunk`` steps inside one jitted
``while_loop`` (which exits early once every row is done); between chunks the host reads the new
tokens, to stream them and to check stop strings. ``chunk`` large enough means a single call.

The cache is [layers, batch, kv_heads, cache_len, head_dim] (:data:`jaxllama.program.CACHE_AXES`),
sharded by the same logical rules as the model: batch as the batch, kv heads as the ``kv_heads``
rule says (over ``tensor`` by default; ``[kv_heads, null]`` keeps them whole on every device).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.errors import ConfigError
from jaxllama.infer.sampling import Sampling, sample
from jaxllama.model.llama import Arch, Llama
from jaxllama.parallel.sharding import Layout
from jaxllama.program import CACHE_AXES

HOST_VIEW = ("out", "logprobs", "n", "done", "stopped")  # state the host reads after each chunk
PROMPT_BUCKET = 16  # prompt lengths and cache lengths round up to this, to reuse compilations


@dataclass
class Completion:
    """One generated row. ``finish_reason``: ``stop`` (a stop token or string), ``length``
    (max-new-tokens or the model's context); ``done``: the row will not grow any more."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    done: bool = False


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass(frozen=True)
class _Program:
    """The device side of one engine configuration. Hashable: it is the static argument of the jitted
    functions below, so every Engine with the same model, mesh and sampling kind shares compilations."""

    arch: Arch
    layout: Layout
    vocab_limit: int | None
    sampling: Sampling

    @property
    def model(self) -> Llama:
        return Llama(self.arch, self.layout)

    def prefill(self, params, tokens, lengths, row_ids, live, stop_ids, seed, cache_len: int, max_new: int):
        a = self.arch
        b = tokens.shape[0]
        cache = self.empty_cache(b, cache_len)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, cache = self.model.apply({"params": params}, tokens, positions, cache, lengths - 1,
                                         method=Llama.decode)
        vocab = a.vocab_size if self.sampling.repetition_penalty != 1.0 else 1
        rows = jnp.arange(b)
        valid = positions < lengths[:, None]
        seen = jnp.zeros((b, vocab), bool).at[rows[:, None], jnp.where(valid, tokens, vocab)].set(True, mode="drop")
        state = dict(
            cache=cache, seen=seen, row_ids=row_ids, stop_ids=stop_ids,
            pos=lengths, last=jnp.zeros((b,), jnp.int32), n=jnp.zeros((b,), jnp.int32),
            limit=jnp.minimum(max_new, cache_len - lengths) * live, done=~live,
            out=jnp.zeros((b, max_new), jnp.int32), logprobs=jnp.zeros((b, max_new), jnp.float32),
            stopped=jnp.zeros((b,), bool), step=jnp.zeros((), jnp.int32), seed=seed)
        state["done"] = state["done"] | (state["limit"] <= 0)
        return self.record(state, logits)

    def empty_cache(self, batch: int, cache_len: int) -> tuple:
        return empty_cache(self.arch, self.layout, batch, cache_len)

    def constrain_cache(self, cache: tuple) -> tuple:
        return constrain_cache(self.arch, self.layout, cache)

    def record(self, state, logits):
        """Sample from ``logits`` and append the tokens of rows still running."""
        if self.vocab_limit is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)
        tok, lp = sample(logits, state["seen"], state["row_ids"], state["step"], self.sampling, state["seed"])
        active = ~state["done"]
        is_stop = jnp.any(tok[:, None] == state["stop_ids"][None, :], axis=-1)
        keep = active & ~is_stop
        rows = jnp.arange(tok.shape[0])
        slot = jnp.where(keep, state["n"], state["out"].shape[1])  # out of range: dropped
        n = state["n"] + keep
        s = dict(state)
        s["out"] = state["out"].at[rows, slot].set(tok, mode="drop")
        s["logprobs"] = state["logprobs"].at[rows, slot].set(lp, mode="drop")
        s["seen"] = state["seen"].at[rows, jnp.where(keep, tok, state["seen"].shape[1])].set(True, mode="drop")
        s["n"] = n
        s["stopped"] = state["stopped"] | (active & is_stop)
        s["done"] = state["done"] | (active & is_stop) | (n >= state["limit"])
        s["last"] = jnp.where(keep, tok, state["last"])
        s["step"] = state["step"] + 1
        return self.replicate_host_view(s)

    def replicate_host_view(self, s: dict) -> dict:
        """What the host reads each chunk is small: keep it replicated, so every process can read it."""
        s = dict(s)
        for k in HOST_VIEW:
            s[k] = self.layout.constrain(s[k], (None,) * s[k].ndim)
        return s

    def chunk(self, params, state, steps):
        cache_len = jax.tree.leaves(state["cache"])[0].shape[-2]
        end = state["step"] + steps

        def cond(s):
            return (s["step"] < end) & ~jnp.all(s["done"])

        def body(s):
            # Row r feeds its newest token at position pos + n - 1 (its prompt fills 0..pos-1).
            feed_pos = jnp.minimum(s["pos"] + s["n"] - 1, cache_len - 1)
            logits, cache = self.model.apply({"params": params}, s["last"][:, None], feed_pos[:, None], s["cache"],
                                             method=Llama.decode)
            s = dict(s, cache=self.constrain_cache(cache))
            return self.record(s, logits)

        return self.replicate_host_view(jax.lax.while_loop(cond, body, state))



def empty_cache(a: Arch, layout: Layout, batch: int, cache_len: int) -> tuple:
    """Zeros in the model's cache form: stacked (k, v) for scanned layers, else one (k, v) per layer,
    sharded by the cache's logical names (the one owner of the KV-cache layout; the server's slots too).
    ``a.kv_cache_dtype`` int8: each of k and v is (int8 values, float32 scales with a last dim of 1)."""
    per_layer = (batch, a.n_kv_heads, cache_len, a.head_dim)

    def zeros(shape, names):
        if a.kv_cache_dtype == "int8":
            return (layout.constrain(jnp.zeros(shape, jnp.int8), names),
                    layout.constrain(jnp.ones((*shape[:-1], 1), jnp.float32), names))
        return layout.constrain(jnp.zeros(shape, jnp.dtype(a.dtype)), names)

    if a.scan_layers:
        return tuple(zeros((a.n_layers, *per_layer), CACHE_AXES) for _ in range(2))
    return tuple(tuple(zeros(per_layer, CACHE_AXES[1:]) for _ in range(2)) for _ in range(a.n_layers))


def cache_bytes(a: Arch, batch: int, cache_len: int) -> int:
    """Bytes of :func:`empty_cache` (its shapes, nothing allocated)."""
    leaves = jax.tree.leaves(jax.eval_shape(lambda: empty_cache(a, Layout(None), batch, cache_len)))
    return sum(x.size * x.dtype.itemsize for x in leaves)


def constrain_cache(a: Arch, layout: Layout, cache: tuple) -> tuple:
    names = CACHE_AXES if a.scan_layers else CACHE_AXES[1:]
    return jax.tree.map(lambda c: layout.constrain(c, names), cache)


# Shapes and the sampling *kind* are static; the seed and the chunk length are traced, so changing
# them reuses the compiled loop.
@functools.partial(jax.jit, static_argnames=("prog", "cache_len", "max_new"))
def _prefill(params, tokens, lengths, row_ids, live, stop_ids, seed, *, prog: _Program, cache_len: int,
             max_new: int):
    return prog.prefill(params, tokens, lengths, row_ids, live, stop_ids, seed, cache_len, max_new)


@functools.partial(jax.jit, static_argnames=("prog",), donate_argnums=(1,))
def _chunk(params, state, steps, *, prog: _Program):
    return prog.chunk(params, state, steps)


class Engine:
    """Generation for one model (params already placed on ``layout``'s mesh)."""

    def __init__(self, params: dict, arch: Arch, layout: Layout = Layout(None), vocab_limit: int | None = None):
        """``vocab_limit``: the tokenizer's size when the model's vocabulary is padded beyond it; ids at
        or above it are never sampled (they would not decode)."""
        self.params, self.arch, self.layout = params, arch, layout
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < arch.vocab_size else None

    # -- host API ---------------------------------------------------------------------------------

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """One-line errors for prompts the model cannot take."""
        if not prompts:
            raise ConfigError("no prompts given")
        limit = self.arch.max_position
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ConfigError(f"prompt {i + 1} is empty (no tokens)")
            if len(p) >= limit:
                raise ConfigError(f"prompt {i + 1} has {len(p)} tokens; the model's context is {limit} "
                                  f"(max_position), leaving no room to generate")
            bad = [t for t in p if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise ConfigError(f"prompt {i + 1}: token id {bad[0]} is outside the vocabulary (size "
                                  f"{self.arch.vocab_size})")

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_ids: Sequence[int] = (), row_ids: Sequence[int] | None = None, chunk: int = 16,
               force_stop: Callable[[int, list[int]], bool] | None = None) -> Iterator[list[Completion]]:
        """Yield the completions (growing) after the prefill and after each decode chunk.

        ``row_ids`` seed each row's draws (default: its index), so a row samples the same tokens
        whatever else is in the batch. ``force_stop(row, tokens)`` lets the caller end a row
        (stop strings); the last yielded list is final.
        """
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
        if chunk < 1:
            raise ConfigError(f"--chunk: must be >= 1, got {chunk}")
        self.check_prompts(prompts)
        # No row can outgrow the context: capping here keeps a huge --max-new-tokens from sizing buffers.
        max_new_tokens = min(max_new_tokens, self.arch.max_position - min(len(p) for p in prompts))
        n_rows = len(prompts)
        b = _round_up(n_rows, self.layout.shards("activation_batch"))
        longest = max(len(p) for p in prompts)
        t = min(_round_up(longest, PROMPT_BUCKET), self.arch.max_position)
        cache_len = min(_round_up(longest + max_new_tokens, PROMPT_BUCKET), self.arch.max_position)
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        ids = np.arange(b, dtype=np.int32) if row_ids is None else np.asarray(list(row_ids) + [0] * (b - n_rows),
                                                                               np.int32)
        live = np.arange(b) < n_rows
        stops = np.asarray(sorted(set(stop_ids)) or [-1], np.int32)
        put = functools.partial(_put, sharding=None if self.layout.mesh is None else self.layout.sharding(
            ("activation_batch",)))
        prog = _Program(self.arch, self.layout, self.vocab_limit, dataclasses.replace(sampling, seed=0))
        state = _prefill(self.params, put(tokens), put(lengths), put(ids), put(live), stops,
                         np.int32(sampling.seed), prog=prog, cache_len=cache_len, max_new=max_new_tokens)
        results = [Completion() for _ in range(n_rows)]
        while True:
            host = jax.device_get({k: state[k] for k in HOST_VIEW})
            forced = np.zeros((b,), bool)
            for i, r in enumerate(results):
                n = int(host["n"][i])
                r.tokens = host["out"][i, :n].tolist()
                r.logprobs = host["logprobs"][i, :n].tolist()
                r.finish_reason = "stop" if host["stopped"][i] else "length"
                r.done = bool(host["done"][i])
                if not r.done and force_stop is not None and force_stop(i, r.tokens):
                    forced[i] = r.done = True
                    r.finish_reason = "stop"
            yield results
            if forced.any():
                mark = _put(forced, None if self.layout.mesh is None else self.layout.replicated())
                state["done"] = state["done"] | mark
                state["stopped"] = state["stopped"] | mark
            if bool(np.all(host["done"] | forced)):
                return
            state = _chunk(self.params, state, np.int32(chunk), prog=prog)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), row_ids: Sequence[int] | None = None, chunk: int | None = None,
                 force_stop: Callable[[int, list[int]], bool] | None = None) -> list[Completion]:
        """All completions at once (one decode call unless ``chunk`` or ``force_stop`` asks for more)."""
        results: list[Completion] = []
        for results in self.stream(prompts, max_new_tokens, sampling, stop_ids, row_ids,
                                   chunk or max_new_tokens, force_stop):
            pass
        return results


def _put(host: np.ndarray, sharding) -> jax.Array:
    """A host array (the same on every process) onto ``sharding``; each process copies its own rows."""
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def lower_generate(params: dict, arch: Arch, layout: Layout, batch: int, prompt_len: int, max_new: int,
                   sampling: Sampling = Sampling()) -> tuple:
    """The compiled prefill and decode loop of :class:`Engine` for abstract ``params``
    (ShapeDtypeStructs carrying their shardings), ``batch`` rows of ``prompt_len`` tokens and a cache
    of ``prompt_len + max_new`` slots: what ``jaxllama compile-check --generate`` reports on.
    Nothing is allocated; the decode loop is lowered on the prefill's own output shardings."""
    prog = _Program(arch, layout, None, dataclasses.replace(sampling, seed=0))
    rows = None if layout.mesh is None else layout.sharding(("activation_batch",))

    def sds(shape, dtype, sharding=rows):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    i32 = jnp.int32
    prefill = _prefill.lower(params, sds((batch, prompt_len), i32), sds((batch,), i32), sds((batch,), i32),
                             sds((batch,), jnp.bool_), sds((1,), i32, None), sds((), i32, None), prog=prog,
                             cache_len=prompt_len + max_new, max_new=max_new).compile()
    state = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                         prefill.out_info, prefill.output_shardings)
    decode = _chunk.lower(params, state, sds((), i32, None), prog=prog).compile()
    return prefill, decode
