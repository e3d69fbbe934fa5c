"""Sampling filters against Hugging Face's logits processors; draws follow the filtered distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                     TopKLogitsWarper, TopPLogitsWarper)

from jaxllama.errors import ConfigError
from jaxllama.infer.sampling import Sampling, apply_repetition_penalty, filter_logits, sample

V = 64


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 2.0, size=(4, V)).astype(np.float32)


def hf_filter(logits, s: Sampling):
    scores = torch.from_numpy(logits.copy())
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(s.temperature)(ids, scores)
    if s.top_k:
        scores = TopKLogitsWarper(s.top_k)(ids, scores)
    if s.top_p < 1:
        scores = TopPLogitsWarper(s.top_p)(ids, scores)
    if s.min_p:
        scores = MinPLogitsWarper(s.min_p)(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("s", [Sampling(temperature=0.7, top_k=10, top_p=1.0), Sampling(temperature=1.3, top_p=0.8),
                               Sampling(temperature=1.0, min_p=0.1, top_p=1.0), Sampling(temperature=0.9, top_k=20, top_p=0.9,
                                                                              min_p=0.05)],
                         ids=["top_k", "top_p", "min_p", "all"])
def test_filters_match_transformers(logits, s):
    ours = np.asarray(filter_logits(jnp.asarray(logits), s))
    theirs = hf_filter(logits, s)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    kept = ~np.isinf(ours)
    assert 0 < kept.sum() < kept.size  # the filter really removed and kept tokens
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_repetition_penalty_matches_transformers(logits):
    prev = np.array([[1, 5, 5, 9], [0, 2, 3, 4], [63, 62, 1, 1], [7, 7, 7, 7]])
    seen = np.zeros((4, V), bool)
    np.put_along_axis(seen, prev, True, axis=1)
    ours = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(prev), torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert not np.allclose(ours, logits)


def test_draws_follow_the_filtered_distribution(logits):
    s = Sampling(temperature=0.8, top_k=8, top_p=1.0, seed=1)
    n = 4000
    row = np.repeat(logits[:1], n, axis=0)
    tokens, lps = jax.jit(lambda lg, ids: sample(lg, jnp.zeros((n, 1), bool), ids, jnp.int32(0), s))(
        jnp.asarray(row), jnp.arange(n))
    tokens = np.asarray(tokens)
    probs = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits[:1]), s)))[0]
    freq = np.bincount(tokens, minlength=V) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))  # never outside the top-k
    np.testing.assert_allclose(freq, probs, atol=0.03)
    raw = np.asarray(jax.nn.log_softmax(logits[0]))  # reported log-probs are the model's own
    np.testing.assert_allclose(np.asarray(lps), raw[tokens], rtol=1e-5)


def test_seed_and_row_ids_decide_the_draw(logits):
    s = Sampling(temperature=1.0, top_p=1.0)
    seen = jnp.zeros((4, 1), bool)

    def draw(seed, ids):
        return np.asarray(sample(jnp.asarray(logits), seen, jnp.asarray(ids), jnp.int32(3), s, jnp.int32(seed))[0])

    a = draw(0, [0, 1, 2, 3])
    assert np.array_equal(a, draw(0, [0, 1, 2, 3]))
    assert not np.array_equal(np.stack([draw(k, [0, 1, 2, 3]) for k in range(1, 6)]), np.stack([a] * 5))


@pytest.mark.parametrize("kw,msg", [(dict(temperature=-0.1), "--temperature"), (dict(top_k=-1), "--top-k"),
                                    (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"),
                                    (dict(min_p=1.0), "--min-p"), (dict(repetition_penalty=0.0),
                                                                    "--repetition-penalty"),
                                    (dict(temperature=float("nan")), "--temperature")])
def test_out_of_range_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        Sampling(**kw)
