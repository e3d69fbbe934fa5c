"""Mean NLL and perplexity of parameters over an eval source (used by the loop and `jaxllama eval`).

The eval step is the program's (:attr:`jaxllama.program.Program.eval_step`): the training loss
function (same chunked cross-entropy, same masking), so an eval loss and a training loss on the same
batch are the same number.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np


def evaluate(eval_step: Callable, params: Any, batches: Iterable[dict], to_global: Callable[[dict], dict],
             empty_batch: Callable[[], dict], max_batches: int | None = None) -> dict[str, float]:
    """Sums NLL and tokens over the eval batches (up to ``max_batches`` when set).

    The step is a collective, so with several processes every one must run it the same number of
    times: processes agree each step on whether any still has data, and one that has run dry
    feeds ``empty_batch()`` (all loss_mask 0) until all have.
    """
    multi = jax.process_count() > 1
    it = iter(batches)
    pending, count = [], 0
    while not max_batches or count < max_batches:
        local = next(it, None)
        if multi:
            from jax.experimental import multihost_utils

            more = multihost_utils.process_allgather(np.int32(local is not None))
            if not np.any(more):
                break
            local = empty_batch() if local is None else local
        elif local is None:
            break
        pending.append(eval_step(params, to_global(local)))
        count += 1
    nll_sum = n_sum = 0.0
    for nll, n in jax.device_get(pending):
        nll_sum += float(nll)
        n_sum += float(n)
    mean = nll_sum / n_sum if n_sum else math.nan
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 700.0)) if n_sum else math.nan,
            "eval_tokens": int(n_sum), "eval_batches": count}


class Evaluator:
    """Periodic eval inside the training loop: a fresh pass over the eval source each time, through
    the program's eval step (the training loss function)."""

    def __init__(self, program):
        from jaxllama.data.sources import make_source

        self.program, self.cfg, self.make_source = program, program.cfg, make_source
        make_source(self.cfg, split="eval")  # fail now, not at the first eval, if the eval data is missing

    def due(self, step: int) -> bool:
        t = self.cfg.train
        return step == t.steps or (t.eval_every > 0 and step % t.eval_every == 0)

    def __call__(self, params) -> dict[str, float]:
        """The eval figures, with ``eval_time_s`` (the loop leaves it out of training throughput)."""
        start, source = time.perf_counter(), self.make_source(self.cfg, split="eval")
        try:
            result = evaluate(self.program.eval_step, params, source, self.program.batch.to_global,
                              source.empty_batch, self.cfg.train.eval_batches or None)
        finally:
            source.close()
        return dict(result, eval_time_s=time.perf_counter() - start)


def wants_eval(cfg) -> bool:
    """Eval runs when eval data is configured (data.eval_source or data.eval_fraction)."""
    return bool(cfg.data.eval_source) or cfg.data.eval_fraction > 0
