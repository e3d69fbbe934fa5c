"""Loss, train state and the train step: pure functions, jitted with shardings by :mod:`jaxllama.program`.

The loss never builds a float32 [batch, seq, vocab] tensor for large vocabularies: the LM head and
cross-entropy run over sequence chunks inside a rematerialized scan, so only one chunk's logits
exist at a time, forward and backward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxllama.model import lora, quant
from jaxllama.model.llama import Arch, Llama, dense, head_kernel, model_params
from jaxllama.parallel.sharding import Layout, opt_state_shardings

F32 = jnp.float32


@struct.dataclass
class TrainState:
    """``params`` are what is trained (with ``opt_state`` for them); ``frozen`` is the rest of the model
    (a LoRA run's base weights; None in full training). The model sees :meth:`model_tree`."""

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = None
    reference: Any = None  # DPO with a separate reference: its weights, frozen (never checkpointed)

    def model_tree(self) -> Any:
        """The whole canonical parameter tree: the frozen base with the trained leaves put in."""
        return lora.merge(self.frozen, self.params)


def loss_chunk_size(seq_len: int, vocab: int, requested: int = 0) -> int:
    """Largest divisor of seq_len not above ``requested`` (or, when 0, keeping chunk x vocab <= 2^24)."""
    target = requested or max(1, (1 << 24) // vocab)
    return max(c for c in range(1, seq_len + 1) if seq_len % c == 0 and c <= max(target, 1))


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array,
                          chunk: int, dtype: Any, unroll: bool = False) -> tuple[jax.Array, jax.Array]:
    """Sums of masked next-token NLL and of logsumexp^2 (for z-loss), in float32, chunk by chunk.
    ``unroll``: no loop over chunks (the same computation; compile-check's cost variants)."""
    b, t, d = hidden.shape
    n = t // chunk

    def sums(h, tgt, m):
        nll, lse = _nll_lse(h, kernel, tgt, dtype)
        return jnp.sum(nll * m), jnp.sum(lse * lse * m)

    if n == 1:  # the whole sequence is one chunk (small vocabularies): no loop, and no recomputed head
        return sums(hidden, targets, mask.astype(F32))
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ms = mask.reshape(b, n, chunk).swapaxes(0, 1).astype(F32)

    one = jax.checkpoint(sums)  # only one chunk's logits exist at a time, forward and backward

    def body(carry, xs):
        nll, z = one(*xs)
        return (carry[0] + nll, carry[1] + z), None

    (nll, z), _ = jax.lax.scan(body, (jnp.zeros((), F32), jnp.zeros((), F32)), (hs, ts, ms), unroll=n if unroll else 1)
    return nll, z


def _nll_lse(h: jax.Array, kernel: jax.Array, targets: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Per-token next-token NLL and logsumexp of the head's float32 logits."""
    return nll_and_lse(dense(h.astype(dtype), kernel.astype(dtype), F32), targets)


@jax.custom_vjp
def nll_and_lse(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp(logits) - logits[target], logsumexp(logits))`` over the last axis, float32.

    Its backward is one elementwise pass over the logits, ``softmax * (g_nll + g_lse) - onehot * g_nll``.
    Autodiff of ``take_along_axis`` instead scatters into a zero-filled [tokens, vocab] array and, on
    XLA:CPU, then copies it transposed for the head's weight gradient (16.8 MB each at seq 256 x 8,
    vocab 2048)."""
    return _nll_lse_fwd(logits, targets)[0]


def _nll_lse_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (nll, lse), (logits, targets, lse)


def _nll_lse_bwd(res, g):
    logits, targets, lse = res
    g_nll, g_lse = g
    onehot = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1) == targets[..., None]
    d = jnp.exp(logits - lse[..., None]) * (g_nll + g_lse)[..., None] - jnp.where(onehot, g_nll[..., None], 0.0)
    return d.astype(logits.dtype), None


nll_and_lse.defvjp(_nll_lse_fwd, _nll_lse_bwd)


def chunked_token_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int, dtype: Any) -> jax.Array:
    """Per-token NLL [batch, seq] in float32, computed chunk by chunk like :func:`chunked_cross_entropy`
    (only one chunk's logits exist at a time) for losses over whole sequences (preference tuning)."""
    b, t, d = hidden.shape
    n = t // chunk
    if n == 1:
        return _nll_lse(hidden, kernel, targets, dtype)[0]
    one = jax.checkpoint(lambda h, tgt: _nll_lse(h, kernel, tgt, dtype)[0])
    hs, ts = hidden.reshape(b, n, chunk, d).swapaxes(0, 1), targets.reshape(b, n, chunk).swapaxes(0, 1)
    _, out = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (hs, ts))
    return out.swapaxes(0, 1).reshape(b, t)


def make_loss_fn(model: Llama, a: Arch, seq_len: int, z_loss: float = 0.0, loss_chunk: int = 0,
                 unroll: bool = False) -> Callable:
    """``loss_fn(params, batch, rng, reference) -> (objective_sum, (n, sums))``: sums, so micro-batches add
    up; the step divides the objective and every entry of ``sums`` (``loss``, ``tokens``, ...) by ``n``
    (here the trained tokens). ``params`` is the canonical tree (layers stacked) whether or not
    ``a.scan_layers``; ``reference`` is for preference objectives (:mod:`.preference`)."""
    chunk = loss_chunk_size(seq_len, a.vocab_size, loss_chunk)

    def loss_fn(params, batch, rng=None, reference=None):
        # the state holds the canonical (stacked) tree; an unrolled model takes its layers one by one.
        # ``rng``: dropout (LoRA's), training only
        hidden = model.apply({"params": model_params(params, a)}, batch["tokens"], batch["positions"],
                             batch["segment_ids"], method=Llama.hidden,
                             rngs=None if rng is None else {"dropout": rng})
        nll, z = chunked_cross_entropy(hidden, head_kernel(params, a), batch["targets"], batch["loss_mask"],
                                       chunk, a.dtype, unroll)
        n = jnp.sum(batch["loss_mask"].astype(F32))
        return nll + z_loss * z, (n, {"loss": nll, "tokens": n})

    return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1, layout: Layout = Layout(None), dropout_seed: int | None = None) -> Callable:
    """One optimizer step over a global batch, accumulating ``grad_accum`` micro-batches with scan.

    Gradients are taken with respect to ``state.params`` only; ``state.frozen`` (a LoRA base) enters
    the loss as a constant. ``dropout_seed`` (LoRA dropout): each step's and micro-batch's key is
    derived from it and the step, so a resumed run draws the same masks.

    A non-finite loss or gradient leaves params and optimizer state unchanged (``finite`` = 0), so
    the optimizer's own step count is the number of updates applied; the logged ``lr`` is the
    schedule at that count, the rate this step applied (``state.step`` counts skipped steps too).
    """
    grad_fn = jax.value_and_grad(lambda p, frozen, b, rng, ref: loss_fn(lora.merge(frozen, p), b, rng, ref),
                                 has_aux=True)

    def gradients(params, frozen, reference, batch, step):
        key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), step)
        if grad_accum == 1:
            (_, (n, sums)), grads = grad_fn(params, frozen, batch, key, reference)
            return grads, n, sums

        def split(x):  # rows j, j+k, j+2k, ... form micro-batch j: every batch shard feeds each one
            x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
            return layout.constrain(x, (None, "activation_batch", "activation_length"))

        def body(carry, xs):
            j, micro = xs
            (_, aux), g = grad_fn(params, frozen, micro, None if key is None else jax.random.fold_in(key, j), reference)
            return jax.tree.map(jnp.add, carry, (g, *aux)), None

        micro0 = jax.tree.map(lambda x: x[: x.shape[0] // grad_accum], batch)
        _, aux_shapes = jax.eval_shape(lambda: loss_fn(lora.merge(frozen, params), micro0, key, reference))
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), (params, *aux_shapes))
        (grads, n, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), jax.tree.map(split, batch)))
        return grads, n, sums

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        grads, n, sums = gradients(state.params, state.frozen, state.reference, batch, state.step)
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        means = {k: v if k == "tokens" else v / denom for k, v in sums.items()}
        loss = means["loss"]
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state), frozen=state.frozen,
                               reference=state.reference)
        metrics = dict(means, grad_norm=grad_norm, lr=schedule(schedule_count(state.opt_state, state.step)),
                       finite=finite.astype(jnp.int32))
        return new_state, metrics

    return train_step


def schedule_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """The updates applied so far: the first ``count`` in the optimizer state (Optax's schedule and Adam
    states keep one; a skipped step leaves it unchanged), or ``default`` for an optimizer without one."""
    def counted(x):
        return hasattr(x, "_fields") and "count" in x._fields

    found = [x.count for x in jax.tree.leaves(opt_state, is_leaf=counted) if counted(x)]
    return found[0] if found else default


def _init_model(model: Llama) -> Llama:
    """The model that creates parameters: unsharded, with the reference attention (parameters do not
    depend on the kernel, and a length-1 trace is below what the TPU splash kernel accepts) and
    scanned layers: the state is the canonical stacked tree, so a seed gives the same weights whether
    or not the run unrolls its layers, and a checkpoint resumes under either setting. The compute
    dtype is set to the parameter dtype: it does not change the parameters, and programs that differ
    only in it then share one initializer (:func:`_params_init`)."""
    a = model.a
    return model.clone(layout=Layout(None), a=dataclasses.replace(a, attention="xla", scan_layers=True, remat="none",
                                                                   dtype=a.param_dtype))


def state_shardings(boxed: Any, tx: optax.GradientTransformation, layout: Layout,
                    adapters_only: bool = False, reference_boxed: Any = None) -> tuple[TrainState, TrainState]:
    """(abstract state, its shardings) from boxed abstract params (``jaxllama.model.llama.abstract_params``):
    parameters by their logical names, moments like their params. ``adapters_only`` (LoRA): the
    adapter leaves are the trained params, the rest is ``frozen``. ``reference_boxed`` (DPO with a
    separate reference): the reference's boxed abstract params, sharded by their names too."""
    param_sh = layout.tree_shardings(boxed)
    params = nn.unbox(boxed)
    frozen = frozen_sh = None
    if adapters_only:
        (params, frozen), (param_sh, frozen_sh) = lora.split(params), lora.split(param_sh)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = opt_state_shardings(tx, opt, param_sh, layout.replicated())
    ref = ref_sh = None
    if reference_boxed is not None:
        ref, ref_sh = nn.unbox(reference_boxed), layout.tree_shardings(reference_boxed)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt, frozen=frozen,
                          reference=ref)
    return abstract, TrainState(step=layout.replicated(), params=param_sh, opt_state=opt_sh, frozen=frozen_sh,
                                reference=ref_sh)


def init_state(model: Llama, tx: optax.GradientTransformation, shardings: TrainState, seed: int,
               frozen: Any = None) -> TrainState:
    """Parameters and optimizer state created directly in their shards (jit with out_shardings). In a
    LoRA state the adapters are created from ``seed`` and the base is ``frozen`` when given (weights
    from ``train.init_from``), else created from ``seed`` as a full run would."""
    a = _init_model(model).a
    params = _init_part(a, shardings.params, "adapters" if shardings.frozen is not None else "all", seed)
    if shardings.frozen is not None and frozen is None:
        frozen = _init_part(a, shardings.frozen, "base", seed)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      opt_state=opt_state, frozen=frozen)


def quantize_base(a: Arch, float_base: Any, shardings: Any) -> Any:
    """A QLoRA run's float base weights -> its frozen int8/int4 tree, placed per ``shardings`` (the float
    copy is donated). Without quantization the base is returned as it is."""
    if a.quantize == "none":
        return float_base
    fn = jax.jit(lambda t: quant.quantize_tree(t, a.quantize, a.quant_group), out_shardings=shardings,
                 donate_argnums=0)
    return fn(float_base)


def init_base(model: Llama, shardings: TrainState, seed: int) -> Any:
    """A LoRA state's frozen base as ``init_state`` creates it from ``seed`` (the same values a full
    run of that seed starts from)."""
    return _init_part(_init_model(model).a, shardings.frozen, "base", seed)


def _init_part(a: Arch, shardings: Any, part: str, seed: int) -> Any:
    leaves, tree = jax.tree.flatten(shardings)
    return _params_init(a, tree, tuple(leaves), part)(jax.random.key(seed))


@functools.lru_cache(maxsize=16)
def _params_init(a: Arch, tree: Any, leaves: tuple, part: str = "all") -> Callable:
    """The jitted parameter initializer for ``a`` placed per the shardings ``tree``/``leaves``, kept:
    its random draws (one threefry per parameter) take seconds to compile on CPU, and every program
    of the same shapes, dtype and shardings (another optimizer, schedule, remat, kernel, scan or
    unrolled layers) creates its parameters with the same one. ``part``: all, or a LoRA tree's
    adapters or base (the other part's draws are dead code XLA drops; each leaf's value is the same
    as in the whole tree)."""
    model = Llama(dataclasses.replace(a, quantize="none"))  # a QLoRA base is made from float weights

    def init(key):
        params = nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
        if part == "all":
            return params
        adapters, base = lora.split(params)
        if part == "adapters":
            return adapters
        return base if a.quantize == "none" else quant.quantize_tree(base, a.quantize, a.quant_group)

    return jax.jit(init, out_shardings=jax.tree.unflatten(tree, leaves))
