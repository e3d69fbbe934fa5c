"""The Llama decoder (Flax Linen): embed -> N x [RMSNorm, attention, RMSNorm, SwiGLU] -> RMSNorm -> head.

Parameter tree (the canonical layout every converter reads and writes; kernels are [in, out] and
per-layer weights are stacked on a leading ``layers`` axis)::

    embed_tokens/embedding                  [vocab, embed]
    layers/input_layernorm/scale            [layers, embed]
    layers/self_attn/{q,k,v,o}_proj/kernel  [layers, embed, heads*head_dim] ... o: [layers, heads*head_dim, embed]
    layers/post_attention_layernorm/scale   [layers, embed]
    layers/mlp/{gate,up,down}_proj/kernel   [layers, embed, mlp] ... down: [layers, mlp, embed]
    norm/scale                              [embed]
    lm_head/kernel                          [embed, vocab]   (absent when embeddings are tied)

RoPE uses Hugging Face's half-split ("rotate_half") layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

from jaxllama.model import cpu_kernels, quant
from jaxllama.model.attention import attend, cached_attention, resolve_impl
from jaxllama.parallel.sharding import RESIDUAL_AXES, Layout, boxed_shapes

# Activations carry activation_* logical names (see jaxllama/parallel/sharding.py); weights the plain ones.
Q_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
# One layer's KV cache, heads-major: [batch, kv_heads, cache_len, head_dim] (scanned layers stack a
# leading "layers" axis: jaxllama.program.CACHE_AXES). Heads before positions, so that attention over
# the cache is a plain batched matmul over (batch, kv_heads): with positions first XLA transposes the
# whole cache of every layer at every decode step (on CPU a quarter of a batch-16 step).
LAYER_CACHE_AXES = ("activation_batch", "activation_kv_heads", "activation_length", "activation_head_dim")

F32 = jnp.float32
_REMAT = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    # Keep weight-matmul outputs: those of `dense` by name (a custom VJP hides its dot from the policy).
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, jax.checkpoint_policies.save_only_these_names("dense")),
}


# Set by LoRA's config or by inference options, not model.*:
_NOT_MODEL_CONFIG = ("quantize", "quant_group", "quant_embed", "kv_cache_dtype")


@dataclass(frozen=True)
class Arch:
    """Resolved, hashable model hyper-parameters (built from a resolved ``ModelConfig``)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_position: int
    norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    scan_layers: bool = True
    remat: str = "none"
    # LoRA (jaxllama/model/lora.py): rank 0 = none; targets are HF module names (q_proj ... down_proj)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    # Weight-only quantization (jaxllama/model/quant.py): none | int8 | int4, for QLoRA's frozen base
    # and for quantized inference; int4's (and a GGUF's grouped int8's) input rows per scale.
    quantize: str = "none"
    quant_group: int = 128
    quant_embed: bool = False  # also the embedding table and LM head (inference; QLoRA trains over a float one)
    kv_cache_dtype: str = "auto"  # inference's KV cache: auto (the compute dtype) | int8 (quant.quantize_kv)

    @classmethod
    def model_fields(cls) -> list[str]:
        """The fields that mirror ``model.*`` (:class:`jaxllama.config.ModelConfig`); the rest come from
        LoRA's config or from inference options."""
        return [k for k in cls.__dataclass_fields__ if not k.startswith("lora_") and k not in _NOT_MODEL_CONFIG]

    @classmethod
    def from_config(cls, m, lora=None) -> "Arch":
        """From a resolved :class:`jaxllama.config.ModelConfig` (and a ``LoraConfig`` with rank > 0 for
        adapters); ``dtype: auto`` picks by backend."""
        values = {k: getattr(m, k) for k in cls.model_fields()}
        if lora is not None and lora.rank:
            mode = getattr(lora, "quantize", "none")  # QLoRA: int8 per output channel, int4 grouped
            values.update(lora_rank=lora.rank, lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                          lora_targets=tuple(lora.targets), quantize=mode,
                          quant_group=getattr(lora, "group_size", 128) if mode == "int4" else 0)
        if values["dtype"] == "auto":
            values["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        values["attention"] = resolve_impl(values["attention"], values["dtype"])
        return cls(**values)


def rope_frequencies(a: Arch) -> np.ndarray:
    """Inverse frequencies [head_dim/2], with Llama 3.1's long-context scaling when configured."""
    inv = 1.0 / (a.rope_theta ** (np.arange(0, a.head_dim, 2, dtype=np.float64) / a.head_dim))
    if a.rope_type != "llama3":
        return inv.astype(np.float32)
    low_wavelen = a.rope_original_max_position / a.rope_low_freq_factor
    high_wavelen = a.rope_original_max_position / a.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / a.rope_factor, inv)
    smooth = (a.rope_original_max_position / wavelen - a.rope_low_freq_factor) / (
        a.rope_high_freq_factor - a.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / a.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(a: Arch, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, len, head_dim] in float32 for explicit integer positions [batch, len]."""
    freqs = positions[..., None].astype(F32) * jnp.asarray(rope_frequencies(a))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, len, heads, head_dim]; half-split rotation as in Hugging Face."""
    x32 = x.astype(F32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class RMSNorm(nn.Module):
    a: Arch

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.dtype(self.a.param_dtype))
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.a.norm_eps)
        return (y * scale.astype(F32)).astype(self.a.dtype)


class Linear(nn.Module):
    """y = x @ kernel, kernel [in, out] with logical names ``axes``; computed in the compute dtype."""

    a: Arch
    features: int
    axes: tuple[str, str]
    std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.a
        if a.quantize != "none" and (self.name in quant.BLOCK_LINEARS or (a.quant_embed and self.name == "lm_head")):
            y = self._quantized(x)
        else:
            init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes)
            kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.dtype(a.param_dtype))
            xc, kc = x.astype(a.dtype), kernel.astype(a.dtype)
            if cpu_kernels.wanted_f32(math.prod(x.shape[:-1]), xc.dtype, kc.dtype):  # CPU decoding
                y = cpu_kernels.fmatmul(xc, kc, "io")
            else:
                y = checkpoint_name(dense(xc, kc), "dense")
        if a.lora_rank and self.name in a.lora_targets:
            y = y + self._lora(x)
        return y

    def _quantized(self, x: jax.Array) -> jax.Array:
        """A quantized kernel (QLoRA's frozen base, or quantized inference): int8/int4 values and float32
        scales in :mod:`jaxllama.model.quant`'s output-major layout. Their values always come from
        quantizing float weights (``quant.quantize_tree``) or from a quantized file, never from init."""
        a, d_in, mode = self.a, x.shape[-1], self.a.quantize
        q = quant.param(self, "kernel_q", self.axes[::-1], quant.q_shape(mode, d_in, self.features), quant.QDTYPE[mode])
        scale = quant.param(self, "kernel_scale", (self.axes[1], None),
                            quant.scale_shape(mode, a.quant_group, d_in, self.features), jnp.float32, ones=True)
        return checkpoint_name(quant.matmul(x, q, scale, a.dtype), "dense")

    def _lora(self, x: jax.Array) -> jax.Array:
        """The adapter's ``alpha / rank * dropout(x) A B``: A [in, rank] is sharded like the kernel's input
        dimension, B [rank, out] like its output (so the adapter follows its base kernel under any rules).
        A starts as PEFT's (uniform +-1/sqrt(in)), B at zero: the initial delta is exactly zero.
        Both products go through :func:`dense`: autodiff's 3-D ``dB = h^T dy`` makes XLA:CPU write the
        [tokens, out] gradient transposed (a strided copy per projection, a fifth of the LoRA step)."""
        a, d_in = self.a, x.shape[-1]
        bound = 1.0 / math.sqrt(d_in)
        lora_a = self.param("lora_a", nn.with_logical_partitioning(
            lambda k, s, dt: jax.random.uniform(k, s, dt, -bound, bound), (self.axes[0], None)),
            (d_in, a.lora_rank), jnp.dtype(a.param_dtype))
        lora_b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, self.axes[1])),
                            (a.lora_rank, self.features), jnp.dtype(a.param_dtype))
        if a.lora_dropout > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - a.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1 - a.lora_dropout), 0).astype(x.dtype)
        h = dense(x.astype(a.dtype), lora_a.astype(a.dtype))
        return (dense(h, lora_b.astype(a.dtype)) * (a.lora_alpha / a.lora_rank)).astype(a.dtype)


class Attention(nn.Module):
    a: Arch
    layout: Layout

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache=None, positions=None, extend=False, window=None):
        """``cache``: None (training) or this layer's (k, v) [batch, kv_heads, cache_len, head_dim].

        With a cache, the new keys/values are written at ``positions`` and returned as the new cache.
        A multi-token call is a prefill from position 0 (causal attention over the new tokens); a
        one-token call is a decode step that attends to every cached slot up to its own position.
        ``extend``: a multi-token call that continues a cache (a chunk of a long prompt, every row
        starting at the same position): written after what is cached and attending to all of it.
        ``window`` (static): attend to the cache's first ``window`` slots only, when no query is past
        them (a server's slots are sized for the longest request; most steps need far fewer).
        """
        a, b, t = self.a, x.shape[0], x.shape[1]
        out_std = 0.02 / math.sqrt(2 * a.n_layers)
        q = Linear(a, a.n_heads * a.head_dim, ("embed", "heads"), name="q_proj")(x)
        k = Linear(a, a.n_kv_heads * a.head_dim, ("embed", "kv_heads"), name="k_proj")(x)
        v = Linear(a, a.n_kv_heads * a.head_dim, ("embed", "kv_heads"), name="v_proj")(x)
        q = apply_rope(q.reshape(b, t, a.n_heads, a.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, a.n_kv_heads, a.head_dim), cos, sin)
        v = v.reshape(b, t, a.n_kv_heads, a.head_dim)
        q = self.layout.constrain(q, Q_AXES)
        k = self.layout.constrain(k, KV_AXES)
        v = self.layout.constrain(v, KV_AXES)
        if cache is not None and (t == 1 or extend):  # attend over what is cached, then write
            kc, vc = cache if window is None else jax.tree.map(lambda c: c[:, :, :window], cache)
            out = cached_attention(q, kc, vc, positions, k, v)
            # The write after the reads: XLA:CPU otherwise schedules the write first and copies the
            # cache to keep the old one for attention (every layer's, several times a step: a third
            # of a batch-16 step). A zero from the output orders them; it changes no value.
            after = (out.reshape(-1)[0] * 0).astype(k.dtype)
            cache = write_cache(cache, k + after, v + after, positions, self.layout, extend)
        else:
            if cache is not None:  # a prefill: write, then attend over the new tokens alone
                cache = write_cache(cache, k, v, positions, self.layout, extend)
            out = attend(a.attention, q, k, v, segment_ids, self.layout.mesh,
                         *(self.layout.mesh_axes(n) for n in ("activation_batch", "activation_heads",
                                                               "activation_kv_heads")))
        out = Linear(a, a.dim, ("heads", "embed"), std=out_std, name="o_proj")(out.reshape(b, t, -1))
        return out if cache is None else (out, cache)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, kernel: jax.Array, out_dtype: Any = None) -> jax.Array:
    """x @ kernel for x [..., in] (``out_dtype``: the product's, e.g. float32 logits from bfloat16
    operands). The kernel's gradient is computed as one 2-D matmul,
    ``x2d.T @ dy2d`` over all tokens: XLA:CPU otherwise lays the [tokens, out] gradient out transposed
    with a slow strided copy before the matmul (a quarter of the CPU step time; the same math, and
    on TPU/GPU the same program once XLA folds the transpose into the matmul)."""
    return jnp.dot(x, kernel, preferred_element_type=out_dtype)


def _dense_fwd(x, kernel, out_dtype=None):
    return dense(x, kernel, out_dtype), (x, kernel)


def _dense_bwd(out_dtype, res, g):
    x, kernel = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, kernel.T)
    dk = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1])).astype(kernel.dtype)
    return dx, dk


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up. Its backward keeps only ``gate`` and ``up`` (autodiff of the expression keeps
    four [tokens, ffn] arrays per layer: gate, up, sigmoid(gate), silu(gate)) and computes both input
    gradients in one elementwise pass: half the saved activations of the widest layer, and on CPU a
    fifth less train-step time (benchmarks/README.md)."""
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    x, g32 = gate.astype(F32), g.astype(F32)
    sig = jax.nn.sigmoid(x)
    d_up = g32 * x * sig
    d_gate = g32 * up.astype(F32) * sig * (1 + x * (1 - sig))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
    a: Arch

    @nn.compact
    def __call__(self, x):
        a = self.a
        gate = Linear(a, a.ffn_dim, ("embed", "mlp"), name="gate_proj")(x)
        up = Linear(a, a.ffn_dim, ("embed", "mlp"), name="up_proj")(x)
        h = swiglu(gate, up)
        return Linear(a, a.dim, ("mlp", "embed"), std=0.02 / math.sqrt(2 * a.n_layers), name="down_proj")(h)


class Block(nn.Module):
    a: Arch
    layout: Layout

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache=None, positions=None, extend=False, window=None):
        attn = Attention(self.a, self.layout, name="self_attn")(RMSNorm(self.a, name="input_layernorm")(x),
                                                               cos, sin, segment_ids, cache, positions, extend, window)
        if cache is not None:
            attn, cache = attn
        h = x + attn
        out = h + MLP(self.a, name="mlp")(RMSNorm(self.a, name="post_attention_layernorm")(h))
        return self.layout.constrain(out, RESIDUAL_AXES), cache


class Embed(nn.Module):
    a: Arch

    def setup(self):
        a = self.a
        if a.quantize != "none" and a.quant_embed:  # quantized inference: output-major, like a tied head
            mode = a.quantize
            self.embedding_q = quant.param(self, "embedding_q", ("vocab", "embed"),
                                           quant.q_shape(mode, a.dim, a.vocab_size), quant.QDTYPE[mode])
            self.embedding_scale = quant.param(self, "embedding_scale", ("vocab", None),
                                               quant.scale_shape(mode, a.quant_group, a.dim, a.vocab_size),
                                               jnp.float32, ones=True)
            return
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (a.vocab_size, a.dim), jnp.dtype(a.param_dtype))

    @property
    def quantized(self) -> bool:
        return self.a.quantize != "none" and self.a.quant_embed

    def __call__(self, tokens):
        if self.quantized:
            return quant.embed_rows(self.embedding_q, self.embedding_scale, tokens, self.a.dtype)
        return jnp.take(self.embedding, tokens, axis=0).astype(self.a.dtype)

    def attend(self, x):
        """Logits of a tied head. (XLA:CPU fuses the transpose into the matmul's operand read; an explicit
        ``dot_general`` over the table's embed axis measured slower for batch-1 decoding.)"""
        if self.quantized:
            return quant.matmul(x, self.embedding_q, self.embedding_scale, self.a.dtype).astype(F32)
        xc, table = x.astype(self.a.dtype), self.embedding.astype(self.a.dtype)
        if cpu_kernels.wanted_f32(math.prod(x.shape[:-1]), xc.dtype, table.dtype):  # CPU decoding
            return cpu_kernels.fmatmul(xc, table, "oi")
        return jnp.dot(xc, table.T, preferred_element_type=F32)


class Llama(nn.Module):
    """``__call__`` gives float32 logits; ``hidden`` gives the final normed states (for chunked losses)."""

    a: Arch
    layout: Layout = Layout(None)

    def setup(self):
        a = self.a
        self.embed_tokens = Embed(a)
        block = Block
        if a.remat != "none":
            block = nn.remat(Block, policy=_REMAT[a.remat], prevent_cse=not a.scan_layers)
        if a.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast), length=a.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            self.layers = stack(a, self.layout)
        else:
            self.layers = [block(a, self.layout) for _ in range(a.n_layers)]
        self.norm = RMSNorm(a)
        if not a.tie_embeddings:
            self.lm_head = Linear(a, a.vocab_size, ("embed", "vocab"))

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        return self._trunk(tokens, positions, segment_ids, None)[0]

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: tuple,
               last: jax.Array | None = None, extend: bool = False, all_logits: bool = False,
               window: int | None = None) -> tuple[jax.Array, tuple]:
        """Forward with a KV cache: with scanned layers ``(k, v)``, each [layers, batch, kv_heads,
        cache_len, head_dim]; with unrolled layers one ``(k, v)`` per layer, each [batch, kv_heads,
        cache_len, head_dim] (separate buffers, so a decode loop updates each in place).

        ``tokens``/``positions`` [batch, len]: a prefill (len > 1, positions 0..len-1) or one decode
        step (len 1, each row at its own position). Returns float32 logits [batch, vocab] at index
        ``last`` [batch] of each row (default: the final one) and the updated cache; only those rows'
        logits are computed, so a long prompt never materializes [batch, len, vocab].

        ``extend`` (unrolled layers only): ``tokens`` continue what the cache holds, from
        ``positions[:, 0]`` (the server's chunked prefill). ``all_logits``: logits at every position,
        [batch, len, vocab] (prompt log-probabilities, e.g. ``echo`` with ``logprobs``). ``window``:
        see :class:`Attention` (unrolled layers only).
        """
        mesh = self.layout.mesh
        with cpu_kernels.decoding(mesh is None or mesh.size == 1):  # native CPU products, unsharded only
            h, cache = self._trunk(tokens, positions, None, cache, extend, window)
            if all_logits:
                return self.head(h), cache
            idx = jnp.full((h.shape[0],), h.shape[1] - 1) if last is None else last
            h = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
            return self.head(h), cache

    def _trunk(self, tokens, positions, segment_ids, cache, extend=False, window=None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cos, sin = rope_tables(self.a, positions)
        x = self.layout.constrain(self.embed_tokens(tokens), RESIDUAL_AXES)
        if self.a.scan_layers:
            if extend or window is not None:
                raise ValueError("extend and window need unrolled layers (scan_layers=False)")
            x, cache = self.layers(x, cos, sin, segment_ids, cache, positions)
        else:
            new = []
            for i, layer in enumerate(self.layers):
                x, c = layer(x, cos, sin, segment_ids, None if cache is None else cache[i], positions, extend, window)
                new.append(c)
            cache = None if cache is None else tuple(new)
        return self.norm(x), cache

    def head(self, x: jax.Array) -> jax.Array:
        if self.a.tie_embeddings:
            return self.embed_tokens.attend(x)
        return self.lm_head(x).astype(F32)

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self.head(self.hidden(tokens, positions, segment_ids))


def write_cache(cache: tuple, k: jax.Array, v: jax.Array, positions: jax.Array,
                layout: Layout, extend: bool = False) -> tuple:
    """Store k, v [batch, len, kv_heads, head_dim] into one layer's cache ([batch, kv_heads, cache_len,
    head_dim], :data:`LAYER_CACHE_AXES`) at slots ``positions``. An int8 cache (``kv_cache_dtype``)
    holds each of k and v as (int8 values, float32 scale [batch, kv_heads, cache_len, 1]).

    A prefill (len > 1) fills slots 0..len-1 with one dynamic_update_slice (``extend``: slots from
    ``positions[0, 0]`` on; the caller keeps them inside the cache, which would otherwise shift the
    write); a decode step scatters each row's single token to its own slot (rows advance independently).
    """
    start = positions[0, 0] if extend else 0

    def store(c, new):
        new = new.astype(c.dtype)
        if new.shape[1] > 1:
            c = jax.lax.dynamic_update_slice(c, jnp.swapaxes(new, 1, 2), (0, 0, start, 0))
        else:  # row r's [kv_heads, head_dim] to its slot positions[r]
            c = c.at[jnp.arange(c.shape[0]), :, positions[:, 0]].set(new[:, 0], mode="drop")
        return layout.constrain(c, LAYER_CACHE_AXES)

    out = []
    for c, new in ((cache[0], k), (cache[1], v)):
        out.append(tuple(map(store, c, quant.quantize_kv(new))) if isinstance(c, tuple) else store(c, new))
    return out[0], out[1]


def abstract_params(a: Arch) -> dict:
    """Parameter shapes with their logical-axis boxes, never materialized. Traced unsharded with the
    reference attention: parameters do not depend on the kernel, and a length-1 trace is below what
    the TPU splash kernel accepts."""
    a = dataclasses.replace(a, attention="xla")
    return jax.eval_shape(lambda: Llama(a).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


@functools.lru_cache(maxsize=32)
def param_shapes(a: Arch) -> dict[str, tuple[int, ...]]:
    """The canonical tree's shapes, read off the model itself (never written out by hand):
    ``{"layers/self_attn/k_proj/kernel": (layers, dim, kv_heads * head_dim), ...}``, layers stacked.
    Converters and the FLOPs count ask this; nothing is allocated."""
    boxed = abstract_params(dataclasses.replace(a, scan_layers=True, remat="none"))
    return {name: shape for name, shape, _ in boxed_shapes(boxed)}


def head_kernel(params: dict, a: Arch) -> jax.Array:
    """The LM head as an [embed, vocab] matrix (the transposed embedding when tied); a quantized head
    (quantized inference, e.g. ``jaxllama eval --quantize``) is dequantized."""
    node = params["embed_tokens"] if a.tie_embeddings else params["lm_head"]
    if "embedding_q" in node:
        q = node["embedding_q"]
        return quant.dequantize(q, node["embedding_scale"], quant.mode_of(q), jnp.dtype(a.dtype))
    if "kernel_q" in node:
        q = node["kernel_q"]
        return quant.dequantize(q, node["kernel_scale"], quant.mode_of(q), jnp.dtype(a.dtype))
    return node["embedding"].T if a.tie_embeddings else node["kernel"]


def _layers_of(x: Any, n: int) -> list:
    """The ``n`` layers of a stacked leaf. A JAX array (or tracer) is cut with one ``lax.split``, whose
    gradient is one concatenate (per-layer slices would transpose to ``n`` zero-padded full-size
    adds: ~15% of a 30-layer step on CPU); a numpy array gives views; a sharding or ShapeDtypeStruct
    loses its leading ``layers`` axis (so one function maps params, their shardings and abstract params)."""
    if isinstance(x, NamedSharding):
        return [NamedSharding(x.mesh, PartitionSpec(*x.spec[1:]))] * n
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = _layers_of(x.sharding, 1)[0] if isinstance(x.sharding, NamedSharding) else None
        return [jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)] * n
    if isinstance(x, np.ndarray):
        return list(x)
    return [piece[0] for piece in jax.lax.split(x, [1] * n)]


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Scanned tree (``layers`` stacked) -> unrolled tree (``layers_0`` ... ``layers_{n-1}``). Works on
    arrays, shardings and abstract params alike; a tree already unrolled is returned as it is."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    leaves, tree = jax.tree.flatten(params["layers"])
    per_leaf = [_layers_of(x, n_layers) for x in leaves]
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.unflatten(tree, [layers[i] for layers in per_leaf])
    return out


def model_params(params: dict, a: Arch) -> dict:
    """The canonical tree (what the train state and checkpoints hold) -> the tree ``Llama(a)`` takes:
    unrolled (``layers_0`` ...) when ``a.scan_layers`` is off. Arrays, shardings or abstract params."""
    return params if a.scan_layers else unstack_layers(params, a.n_layers)


def stack_layers(params: dict, n_layers: int) -> dict:
    """Inverse of :func:`unstack_layers`: the canonical stacked layout."""
    if "layers" in params:
        return params
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n_layers)])
    return out
