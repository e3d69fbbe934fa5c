"""Logits match Hugging Face transformers' LlamaForCausalLM (PyTorch, CPU, float32) to 1e-4.

The weights go across through jaxllama.convert.hf_names, so this also pins the name mapping the
converters use.
"""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import ARCH_CASES, arch_for, random_params
from jaxllama.convert.hf_names import hf_config_dict, to_hf_tensors
from jaxllama.model.llama import Llama


def hf_model(a, params):
    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(a))).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_hf_tensors(params, a)}
    if a.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@pytest.mark.parametrize("case", ARCH_CASES)
def test_logits_match_transformers(case):
    a = arch_for(*ARCH_CASES[case])
    params = random_params(a, seed=len(case))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, a.vocab_size, size=(2, 24))
    positions = np.arange(24)[None].repeat(2, 0) + np.array([[0], [150]])  # second row: far positions
    ours = np.asarray(Llama(a).apply({"params": params}, tokens, positions))
    with torch.no_grad():
        theirs = hf_model(a, params)(input_ids=torch.from_numpy(tokens),
                                     position_ids=torch.from_numpy(positions)).logits.numpy()
    assert np.abs(ours).max() > 1.0  # the comparison is not between near-zero logits
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    if case == "llama3_rope":  # the scaling must matter at these positions, or the case tests nothing
        plain = np.asarray(Llama(dataclasses.replace(a, rope_type="default")).apply({"params": params}, tokens, positions))
        assert np.abs(plain - ours).max() > 1e-2


def test_hf_names_cover_every_parameter():
    a = arch_for()
    params = random_params(a)
    names = dict(to_hf_tensors(params, a))
    expected = set(LlamaForCausalLM(LlamaConfig(**hf_config_dict(a))).state_dict())
    assert set(names) == expected
