"""The KV-cache engine against references: full-forward recompute, Hugging Face generate, sharding.

Random debug-sized models with O(1) activations (tests/helpers.py), so greedy choices are far from
ties and token-for-token equality is a meaningful check.
"""

import jax
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import arch_for, random_params
from jaxllama.convert.hf_names import hf_config_dict, to_hf_tensors
from jaxllama.errors import ConfigError
from jaxllama.infer.engine import Engine
from jaxllama.infer.placement import inference_program, parse_mesh, place_params
from jaxllama.infer.sampling import Sampling
from jaxllama.model.llama import Llama

GREEDY = Sampling(temperature=0)
NEW = 12


@pytest.fixture(scope="module")
def model():
    a = arch_for("model.n_heads=8", "model.n_kv_heads=4", "model.head_dim=16")
    params = random_params(a, seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, a.vocab_size, n).tolist() for n in (5, 19, 1, 9)]
    engine = Engine(params, a)
    return a, params, prompts, engine, engine.generate(prompts, NEW, GREEDY)


def recompute_greedy(a, params, prompt, n):
    """Greedy decoding that runs the whole sequence through the training forward for every token
    (right-padded to one length, which a causal model ignores, so it compiles once)."""
    forward = jax.jit(lambda p, t: Llama(a).apply({"params": p}, t))
    toks, lps = list(prompt), []
    for _ in range(n):
        padded = np.zeros((1, len(prompt) + n), np.int32)
        padded[0, :len(toks)] = toks
        logits = np.asarray(forward(params, padded))[0, len(toks) - 1]
        lps.append(float(logits[logits.argmax()] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()))
        toks.append(int(logits.argmax()))
    return toks[len(prompt):], lps


def test_cached_greedy_equals_full_recompute(model):
    a, params, prompts, _, out = model
    for prompt, got in zip(prompts, out):
        want, lps = recompute_greedy(a, params, prompt, NEW)
        assert got.tokens == want
        np.testing.assert_allclose(got.logprobs, lps, atol=1e-4)
        assert got.finish_reason == "length"
    assert len({tuple(o.tokens) for o in out}) == len(out)  # rows really differ


def test_greedy_equals_transformers_generate(model):
    a, params, prompts, _, out = model
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(a))).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_hf_tensors(params, a)}
    hf.load_state_dict(state)
    for prompt, got in zip(prompts, out):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got.tokens == gen[0, len(prompt):].tolist()


def test_batch_equals_one_by_one(model):
    _, _, prompts, engine, out = model
    for i in (0, 1):
        assert engine.generate([prompts[i]], NEW, GREEDY)[0].tokens == out[i].tokens
    sampler = Sampling(temperature=1.0, top_p=0.95, seed=7)
    batch = engine.generate(prompts, NEW, sampler)
    for i in (0, 1):  # row ids seed the draws, so sampled rows match too
        assert engine.generate([prompts[i]], NEW, sampler, row_ids=[i])[0].tokens == batch[i].tokens


@pytest.mark.parametrize("mesh", ["tensor=2", "tensor=4", "data=2,tensor=2"])
def test_sharded_equals_unsharded(model, mesh):
    a, params, prompts, _, out = model
    layout = inference_program(a, parse_mesh(mesh)).layout
    placed = place_params(params, a, layout)
    assert len(placed["layers"]["self_attn"]["k_proj"]["kernel"].sharding.device_set) > 1
    got = Engine(placed, a, layout).generate(prompts, NEW, GREEDY, chunk=4)
    assert [g.tokens for g in got] == [o.tokens for o in out]
    for g, o in zip(got, out):
        np.testing.assert_allclose(g.logprobs, o.logprobs, atol=1e-4)


def test_top_k_one_equals_greedy(model):
    _, _, prompts, engine, out = model
    got = engine.generate(prompts, NEW, Sampling(temperature=1.5, top_k=1, seed=3))
    assert [g.tokens for g in got] == [o.tokens for o in out]


def test_seed_reproduces_and_matters(model):
    _, _, prompts, engine, out = model
    s = Sampling(temperature=1.0, seed=11)
    first = [g.tokens for g in engine.generate(prompts, NEW, s)]
    assert first == [g.tokens for g in engine.generate(prompts, NEW, s, chunk=3)]
    other = [g.tokens for g in engine.generate(prompts, NEW, Sampling(temperature=1.0, seed=12))]
    assert other != first and first != [o.tokens for o in out]


def test_stops_per_row(model):
    _, _, prompts, engine, out = model
    stop = out[1].tokens[3]  # row 1 stops before its 4th token; others stop wherever it first appears
    got = engine.generate(prompts, NEW, GREEDY, stop_ids=[stop], chunk=2)
    for g, o in zip(got, out):
        k = o.tokens.index(stop) if stop in o.tokens else NEW
        assert g.tokens == o.tokens[:k]
        assert g.finish_reason == ("stop" if k < NEW else "length")
    assert got[1].finish_reason == "stop" and len(got[1].tokens) <= 3
    forced = engine.generate(prompts, NEW, GREEDY, chunk=2, force_stop=lambda row, toks: row == 0 and len(toks) >= 3)
    assert forced[0].finish_reason == "stop" and 3 <= len(forced[0].tokens) < NEW
    assert forced[2].tokens == out[2].tokens
    short = engine.generate(prompts, 4, GREEDY)
    assert [s.tokens for s in short] == [o.tokens[:4] for o in out]


def test_context_limit_ends_rows(model):
    a, _, _, engine, _ = model
    prompt = [i % a.vocab_size for i in range(a.max_position - 3)]
    got = engine.generate([prompt, [1, 2]], 10, GREEDY)
    assert len(got[0].tokens) == 3 and got[0].finish_reason == "length"
    assert len(got[1].tokens) == 10


def test_bad_prompts(model):
    a, _, _, engine, _ = model
    with pytest.raises(ConfigError, match="prompt 2 has 256 tokens; the model's context is 256"):
        engine.generate([[1], list(range(a.max_position))], 4, GREEDY)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        engine.generate([[]], 4, GREEDY)
    with pytest.raises(ConfigError, match="max-new-tokens"):
        engine.generate([[1]], 0, GREEDY)
    with pytest.raises(ConfigError, match="token id 999"):
        engine.generate([[999]], 2, GREEDY)


def test_bad_mesh(model):
    a = model[0]
    with pytest.raises(ConfigError, match="tensor=3 does not divide"):
        inference_program(a, parse_mesh("tensor=3"))
    with pytest.raises(ConfigError, match="16 devices, but only 8"):
        inference_program(a, parse_mesh("data=2,tensor=8"))
    with pytest.raises(ConfigError, match="--mesh: expected"):
        parse_mesh("model=2")


def test_vocab_limit_masks_padded_ids(model):
    a, params, prompts, _, out = model
    engine = Engine(params, a, vocab_limit=40)
    assert max(t for o in out for t in o.tokens) >= 40  # without the limit these ids do come up
    for s in (GREEDY, Sampling(temperature=2.0, seed=1)):
        assert max(t for g in engine.generate(prompts, NEW, s) for t in g.tokens) < 40


def test_tied_llama3_rope_unscanned_matches_transformers():
    """Tied embeddings, Llama 3.1 RoPE scaling and unrolled layers go through the cache path too."""
    over = ["model.tie_embeddings=true", "model.rope_type=llama3", "model.rope_factor=8",
            "model.rope_original_max_position=16", "model.rope_theta=500000", "model.n_heads=4", "model.n_kv_heads=1"]
    a = arch_for(*over)
    params = random_params(a, seed=3)
    unrolled = arch_for(*over, "model.scan_layers=false")
    flat = {k: v for k, v in params.items() if k != "layers"}
    flat.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(a.n_layers)})
    prompts = [[5, 9, 2, 77, 31, 8, 100, 3, 64, 12, 7, 1, 90, 45, 6, 23, 11, 2, 4, 19], [42, 17]]
    got = Engine(flat, unrolled).generate(prompts, 24, GREEDY)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(a))).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_hf_tensors(params, a)}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state)
    for prompt, g in zip(prompts, got):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert g.tokens == gen[0, len(prompt):].tolist()
