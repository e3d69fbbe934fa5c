"""The name and layout mapping between jaxllama's canonical tree and Hugging Face's LlamaForCausalLM.

Both use half-split RoPE, so q/k need no permutation here (Meta/GGUF's interleaved layout is the
conversion issue's one permutation function). HF stores Linear weights [out, in]; we store [in, out].
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxllama.model.llama import Arch

# (our path under layers/, HF name under model.layers.N.)
LAYER_KERNELS = [
    ("self_attn/q_proj/kernel", "self_attn.q_proj.weight"),
    ("self_attn/k_proj/kernel", "self_attn.k_proj.weight"),
    ("self_attn/v_proj/kernel", "self_attn.v_proj.weight"),
    ("self_attn/o_proj/kernel", "self_attn.o_proj.weight"),
    ("mlp/gate_proj/kernel", "mlp.gate_proj.weight"),
    ("mlp/up_proj/kernel", "mlp.up_proj.weight"),
    ("mlp/down_proj/kernel", "mlp.down_proj.weight"),
]
LAYER_NORMS = [
    ("input_layernorm/scale", "input_layernorm.weight"),
    ("post_attention_layernorm/scale", "post_attention_layernorm.weight"),
]


def _get(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def to_hf_tensors(params: dict, a: Arch) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) one tensor at a time, so callers can stream them to disk."""
    yield "model.embed_tokens.weight", np.asarray(params["embed_tokens"]["embedding"])
    layers = params["layers"]
    for i in range(a.n_layers):
        for ours, theirs in LAYER_KERNELS:
            yield f"model.layers.{i}.{theirs}", np.asarray(_get(layers, ours)[i]).T
        for ours, theirs in LAYER_NORMS:
            yield f"model.layers.{i}.{theirs}", np.asarray(_get(layers, ours)[i])
    yield "model.norm.weight", np.asarray(params["norm"]["scale"])
    if not a.tie_embeddings:
        yield "lm_head.weight", np.asarray(params["lm_head"]["kernel"]).T


def hf_config_dict(a: Arch) -> dict:
    """A ``config.json`` for transformers 5.x (``rope_parameters``) that also carries the 4.x keys."""
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    legacy_scaling = None
    if a.rope_type == "llama3":
        extra = {"factor": a.rope_factor, "low_freq_factor": a.rope_low_freq_factor,
                 "high_freq_factor": a.rope_high_freq_factor,
                 "original_max_position_embeddings": a.rope_original_max_position}
        rope = {"rope_type": "llama3", "rope_theta": a.rope_theta, **extra}
        legacy_scaling = {"rope_type": "llama3", **extra}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": a.vocab_size, "hidden_size": a.dim, "intermediate_size": a.ffn_dim,
        "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim, "max_position_embeddings": a.max_position, "rms_norm_eps": a.norm_eps,
        "rope_parameters": rope, "rope_theta": a.rope_theta, "rope_scaling": legacy_scaling,
        "tie_word_embeddings": a.tie_embeddings, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
