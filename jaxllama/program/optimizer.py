"""The Optax chain: global-norm clipping, then AdamW under a warmup schedule.

Weight decay applies to every kernel and to the embedding, and never to RMSNorm scales (a leaf
named ``scale``): decaying a norm's gain toward zero only fights the normalization.
"""

from __future__ import annotations

import jax
import optax

from jaxllama.config import OptimConfig


def make_schedule(o: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay, warmup-stable-decay, or a constant.

    Step ``s`` uses the base schedule at ``s + 1`` (as torchtitan does), so the first update is
    not wasted at a learning rate of zero; the last step reaches ``lr * min_lr_ratio``.
    """
    base = _base_schedule(o, steps)
    return lambda count: base(count + 1)


def _base_schedule(o: OptimConfig, steps: int) -> optax.Schedule:
    warmup = min(o.warmup_steps, steps)
    end = o.lr * o.min_lr_ratio
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(steps, warmup + 1), end)
    ramp = optax.linear_schedule(0.0, o.lr, max(warmup, 1))
    if o.schedule == "constant":
        return optax.join_schedules([ramp, optax.constant_schedule(o.lr)], [warmup])
    decay = max(1, int(round(steps * o.decay_fraction)))
    stable = max(0, steps - warmup - decay)
    return optax.join_schedules(
        [ramp, optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, end, decay)],
        [warmup, warmup + stable])


def decay_mask(params):
    """True where weight decay applies: everything but norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(o: OptimConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(o, steps)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
