"""Next-token selection: repetition penalty, temperature, top-k, top-p, min-p, then a draw.

:class:`Sampling` is frozen and hashable, so it is a static argument of the jitted decode loop:
a greedy run compiles no sort, a top-p run compiles one. Every filter acts on float32 logits
[batch, vocab] and masks rejected tokens with -inf; the draw uses one key per row and step, so a
row's samples depend only on (seed, row id, step) - never on which other rows share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllama.errors import ConfigError

NEG_INF = -jnp.inf


@dataclass(frozen=True)
class Sampling:
    """How to pick each token. ``temperature == 0`` is greedy (argmax; other filters are moot)."""

    temperature: float = 0.6  # defaults: Meta's reference generation settings (also the CLI's)
    top_k: int = 0  # 0: off
    top_p: float = 0.9  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; HF/CTRL style, over prompt and generated tokens
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"--min-p: must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"--repetition-penalty: must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """Tokens already seen get positive logits divided by ``penalty`` and negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, then top-k, top-p and min-p (the order Hugging Face applies them)."""
    logits = logits / s.temperature
    if s.top_k > 0 and s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if s.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
        # The smallest set whose mass reaches top_p: keep a token while the mass before it is < top_p.
        kept = jnp.where(before < s.top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    if s.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        limit = s.min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < limit, NEG_INF, logits)
    return logits


def row_keys(seed: int | jax.Array, row_ids: jax.Array, step: jax.Array) -> jax.Array:
    """One PRNG key per row for this step, from (seed, row id, step) only."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(row_ids)


def sample(logits: jax.Array, seen: jax.Array, row_ids: jax.Array, step: jax.Array,
           s: Sampling, seed: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row. Returns (tokens [batch] int32, log-probabilities [batch] float32).

    ``seed`` (default ``s.seed``) may be a traced integer, so one compilation serves every seed.
    The log-probability is the model's own (log-softmax of the raw logits), as vLLM and OpenAI report
    it, so it does not change with the sampling settings.
    """
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    adjusted = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.greedy:
        tokens = jnp.argmax(adjusted, axis=-1)
    else:
        filtered = filter_logits(adjusted, s)
        keys = row_keys(s.seed if seed is None else seed, row_ids, step)
        tokens = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, filtered)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


# -- per-row settings (the server: every request in the batch brings its own) ------------------------

ROW_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "seed", "step")


def filter_rows(logits: jax.Array, rows: dict, sort: bool) -> jax.Array:
    """:func:`filter_logits` with one setting per row (``rows``: arrays [batch]). ``sort`` (static):
    some row uses top-k or top-p, which need the logits sorted (one sort serves both)."""
    logits = logits / jnp.maximum(rows["temperature"], 1e-6)[:, None]
    if sort:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        k = rows["top_k"]
        kth = jnp.take_along_axis(sorted_logits, jnp.clip(k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)
        logits = jnp.where((k[:, None] > 0) & (logits < kth), NEG_INF, logits)
        sorted_logits = jnp.where((k[:, None] > 0) & (sorted_logits < kth), NEG_INF, sorted_logits)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(before < rows["top_p"][:, None], sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    limit = rows["min_p"][:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < limit, NEG_INF, logits)


def sample_rows(logits: jax.Array, rows: dict, seen: jax.Array, counts: jax.Array, draw: bool, sort: bool,
                penalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row, each row by its own settings (``rows``: :data:`ROW_FIELDS`, arrays [batch]).

    Rows with temperature 0 take the argmax (static ``draw`` False: every row does, and nothing is
    drawn). Penalties (static ``penalize``): the repetition penalty
    over ``seen`` (prompt and output, Hugging Face style), OpenAI's presence and frequency penalties
    over ``counts`` (output tokens only, as vLLM applies them). A row's draw is keyed by (its seed, its
    step) only. Returns (tokens [batch], their log-probabilities, the log-probabilities [batch, vocab]),
    log-probabilities the model's own, before any setting.
    """
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if penalize:
        rep = rows["repetition_penalty"][:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - rows["presence_penalty"][:, None] * (counts > 0) - rows["frequency_penalty"][:, None] * counts
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not draw:
        return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0], logprobs
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(rows["seed"], rows["step"])
    drawn = jax.vmap(jax.random.categorical)(keys, filter_rows(logits, rows, sort))
    tokens = jnp.where(rows["temperature"] > 0, drawn, tokens).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0], logprobs
