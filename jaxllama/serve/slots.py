"""The server's device side: a fixed set of decode slots over one KV cache, and the two steps on it.

The cache is :func:`jaxllama.infer.engine.empty_cache` with one row per slot, ``max_len`` positions
each: per-slot buffers rather than a paged pool. Why: XLA has no paged-attention kernel on CPU or
for our GPU/TPU paths, so a block table would be a gather of every block into a contiguous buffer
each step (the copy paging exists to avoid); per-slot rows are written in place (the state is
donated) and attention reads them directly. The cost is memory reserved for ``max_len`` per slot
whatever the request's length, which ``--slots`` x ``--max-len`` bounds up front (the server prints it).

Two jitted steps, both taking and returning the state (cache, ``seen`` and ``counts`` per slot for
the penalties):

- :func:`prefill_chunk`: ``chunk`` tokens of one request's prompt into its slot, continuing what the
  slot holds (a long prompt is several calls, so decoding of the others runs between them); it
  samples the first new token from the chunk's last valid position and, with ``score``, gives the
  log-probability of every next prompt token (``echo`` with ``logprobs``).
- :func:`decode_step`: one token for every slot; slots not decoding feed a position past the cache,
  whose write is dropped, so a slot being prefilled keeps its rows.

Everything the host decides (which slot, positions, tokens, per-row sampling settings) is an argument,
so several processes given the same arguments run the same program (:mod:`jaxllama.serve.workers`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.infer.engine import cache_bytes, constrain_cache, empty_cache
from jaxllama.infer.sampling import sample_rows
from jaxllama.model.llama import Arch, Llama
from jaxllama.parallel.sharding import Layout

TOP = 20  # alternatives computed when any request asks for top log-probabilities (OpenAI's maximum)
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
INT_FIELDS = ("top_k", "seed", "step")


@dataclass(frozen=True)
class Flags:
    """What the rows of a step need compiled (static): a draw, a sort (top-k/top-p), penalties,
    top alternatives, prompt scores. Each combination is one compilation, made on first use."""

    draw: bool = False
    sort: bool = False
    penalize: bool = False
    top: bool = False
    score: bool = False


@dataclass(frozen=True)
class SlotProgram:
    """The device side of one server: hashable, the static argument of the jitted steps."""

    arch: Arch
    layout: Layout
    slots: int
    max_len: int
    chunk: int
    vocab_limit: int | None

    @property
    def model(self) -> Llama:
        return Llama(self.arch, self.layout)

    def empty_state(self) -> dict:
        v = self.arch.vocab_size
        rows = self.layout.constrain(jnp.zeros((self.slots, v), bool), (None, None))
        return dict(cache=empty_cache(self.arch, self.layout, self.slots, self.max_len), seen=rows,
                    counts=jnp.zeros((self.slots, v), jnp.int32))

    def cache_bytes(self) -> int:
        return cache_bytes(self.arch, self.slots, self.max_len)

    def mask_vocab(self, logits: jax.Array) -> jax.Array:
        if self.vocab_limit is None:
            return logits
        return jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)


def _rows(floats: jax.Array, ints: jax.Array) -> dict:
    out = {k: floats[:, i] for i, k in enumerate(FLOAT_FIELDS)}
    out.update({k: ints[:, i] for i, k in enumerate(INT_FIELDS)})
    return out


def pack_rows(settings: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row sampling settings (dicts of :data:`FLOAT_FIELDS` + :data:`INT_FIELDS`) as two arrays."""
    floats = np.asarray([[s[k] for k in FLOAT_FIELDS] for s in settings], np.float32).reshape(-1, len(FLOAT_FIELDS))
    ints = np.asarray([[s[k] for k in INT_FIELDS] for s in settings], np.int64).reshape(-1, len(INT_FIELDS))
    return floats, (ints & 0x7FFFFFFF).astype(np.int32)


def _top(logprobs: jax.Array, on: bool):
    if not on:
        return None
    vals, ids = jax.lax.top_k(logprobs, TOP)
    return ids.astype(jnp.int32), vals


def _replicated(layout: Layout, tree):
    """Outputs the host reads: replicated, so every process can read them."""
    return jax.tree.map(lambda x: layout.constrain(x, (None,) * x.ndim), tree)


def window(prog: SlotProgram, needed: int) -> int:
    """The attention window (static) for queries at positions below ``needed``: a power of two from
    64, at most the cache; so a step reads only the part of the cache in use, in a few compilations."""
    w = 64
    while w < needed:
        w *= 2
    return min(w, prog.max_len)


@functools.partial(jax.jit, static_argnames=("prog", "flags", "window"), donate_argnums=(1,))
def prefill_chunk(params, state, slot, tokens, start, last, targets, floats, ints, *, prog: SlotProgram,
                  flags: Flags, window: int):
    """Prompt tokens ``tokens`` [chunk] at positions ``start``.. into slot ``slot``; ``last``: index of
    the chunk's last real token (the rest is padding, written past the prompt and overwritten later).
    Returns (state, out): out has the sampled token and its log-probability (meaningful after the
    prompt's final chunk), top alternatives, and with ``score`` each position's log-probability of
    ``targets`` (the next prompt token) and its alternatives."""
    c = prog.chunk
    cache = state["cache"]
    view = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0), cache)
    positions = (start + jnp.arange(c, dtype=jnp.int32))[None]
    logits, view = prog.model.apply({"params": params}, tokens[None], positions, view, jnp.reshape(last, (1,)),
                                    extend=True, all_logits=flags.score, window=window, method=Llama.decode)
    cache = jax.tree.map(lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, slot, axis=0), cache, view)
    out = {}
    if flags.score:
        all_lp = jax.nn.log_softmax(prog.mask_vocab(logits[0].astype(jnp.float32)), axis=-1)  # [chunk, vocab]
        out["score"] = jnp.take_along_axis(all_lp, targets[:, None], axis=-1)[:, 0]
        out["score_top"] = _top(all_lp, flags.top)
        logits = logits[:, last]
    fresh = start == 0
    valid = jnp.arange(c) <= last
    seen = jnp.where(fresh, False, state["seen"][slot]).at[jnp.where(valid, tokens, prog.arch.vocab_size)].set(
        True, mode="drop")
    counts = jnp.where(fresh, 0, state["counts"][slot])
    tok, lp, logprobs = sample_rows(prog.mask_vocab(logits), _rows(floats, ints), seen[None], counts[None],
                                    flags.draw, flags.sort, flags.penalize)
    out.update(token=tok[0], logprob=lp[0], top=_top(logprobs, flags.top))
    state = dict(cache=constrain_cache(prog.arch, prog.layout, cache), seen=state["seen"].at[slot].set(seen),
                 counts=state["counts"].at[slot].set(counts))
    return state, _replicated(prog.layout, out)


@functools.partial(jax.jit, static_argnames=("prog", "flags", "window"), donate_argnums=(1,))
def decode_step(params, state, tokens, positions, active, floats, ints, *, prog: SlotProgram, flags: Flags,
                window: int):
    """Feed each active slot its newest token at its position; sample the next for every slot."""
    s = prog.slots
    pos = jnp.where(active, positions, prog.max_len)  # out of range: the cache write is dropped
    logits, cache = prog.model.apply({"params": params}, tokens[:, None], pos[:, None], state["cache"],
                                     window=window, method=Llama.decode)
    rows = jnp.arange(s)
    fed = jnp.where(active, tokens, prog.arch.vocab_size)
    seen = state["seen"].at[rows, fed].set(True, mode="drop")
    counts = state["counts"].at[rows, fed].add(1, mode="drop")
    tok, lp, logprobs = sample_rows(prog.mask_vocab(logits), _rows(floats, ints), seen, counts, flags.draw,
                                    flags.sort, flags.penalize)
    state = dict(cache=constrain_cache(prog.arch, prog.layout, cache), seen=seen, counts=counts)
    return state, _replicated(prog.layout, dict(token=tok, logprob=lp, top=_top(logprobs, flags.top)))
