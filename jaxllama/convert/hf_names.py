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
    """A float32 ``config.json`` for an :class:`Arch` (see :func:`hf_config`)."""
    return hf_config(a, "float32", None, None)


def hf_config(m, torch_dtype: str, bos: int | None, eos) -> dict:
    """``config.json`` with the 5.x ``rope_parameters`` and the 4.x ``rope_theta``/``rope_scaling``.

    ``m`` is a resolved ModelConfig or an Arch (same field names); transformers of either major
    version reads the result.
    """
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    legacy = None
    if m.rope_type == "llama3":
        extra = {"factor": m.rope_factor, "low_freq_factor": m.rope_low_freq_factor,
                 "high_freq_factor": m.rope_high_freq_factor,
                 "original_max_position_embeddings": m.rope_original_max_position}
        rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, **extra}
        legacy = {"rope_type": "llama3", **extra}
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim, "max_position_embeddings": m.max_position, "rms_norm_eps": m.norm_eps,
        "rope_parameters": rope, "rope_theta": m.rope_theta, "rope_scaling": legacy,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "dtype": torch_dtype, "torch_dtype": torch_dtype,
    }
    if bos is not None:
        cfg["bos_token_id"] = bos
    if eos is not None:
        cfg["eos_token_id"] = eos
    return cfg
