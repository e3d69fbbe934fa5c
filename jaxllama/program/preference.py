"""Preference objectives (``train.objective=dpo|simpo|orpo``): DPO and its losses, SimPO and ORPO, as TRL defines them.

A batch packs pairs whole (:mod:`jaxllama.data.preference`): in every row, segment ``2k + 1`` is the
chosen and ``2k + 2`` the rejected response of pair k, with ``loss_mask`` on the response tokens. The
log-probability of each sequence is the masked sum of its tokens' log-probabilities over its segment,
so a pair's value never depends on what else shares its row.

DPO (TRL's ``DPOTrainer``): with policy and reference sums ``pc, pr, rc, rr`` and
``d = (pc - rc) - (pr - rr)``: ``sigmoid`` is ``-(1 - e) log s(b d) - e log s(-b d)`` (``e`` =
``label_smoothing``: conservative DPO; TRL's sigmoid at e = 0), ``robust`` TRL's robust DPO,
``hinge`` ``relu(1 - b d)``, ``ipo`` ``(d' - 1 / (2 b))^2`` with the log-ratios averaged per
response token. Rewards are ``b (pc - rc)`` and ``b (pr - rr)``. The reference is the frozen base
seen without the adapters (``base``, LoRA: no second copy of the weights) or a separate frozen tree.
SimPO (TRL's ``CPOTrainer``, ``loss_type=simpo``, ``cpo_alpha=0``): reference-free, on the
per-token average log-probabilities ``ac, ar``: ``-(1 - e) log s(b (ac - ar) - g) - e log s(-(...))``.
ORPO (TRL's ``ORPOTrainer``): reference-free, the chosen responses' next-token loss (averaged over their
tokens in the batch) plus ``-b log s(log odds)``, ``log odds = (ac - ar) - (log(1 - e^ac) - log(1 - e^ar))``;
rewards ``b ac`` and ``b ar``. The next-token term covers the chosen *response* tokens, as the ORPO
paper's L_SFT does (TRL's covers the prompt too; with ``loss_mask`` on the responses ours cannot tell).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllama.model import lora
from jaxllama.model.llama import Arch, Llama, head_kernel, model_params
from jaxllama.program.step import chunked_token_nll, loss_chunk_size

F32 = jnp.float32
METRICS = ("reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


def sequence_sums(values: jax.Array, batch: dict, pairs_per_row: int) -> tuple[jax.Array, jax.Array]:
    """Per-row, per-segment sums of ``values * loss_mask`` and of ``loss_mask``: ``[rows, 2 * pairs]`` each,
    column ``2k`` the chosen and ``2k + 1`` the rejected side of pair k."""
    onehot = jax.nn.one_hot(batch["segment_ids"] - 1, 2 * pairs_per_row, dtype=F32)  # segment 0 (padding): none
    mask = batch["loss_mask"].astype(F32)
    return jnp.einsum("bt,bts->bs", values * mask, onehot), jnp.einsum("bt,bts->bs", mask, onehot)


def pair_loss(pc, pr, counts_c, counts_r, rc, rr, d: Any, objective: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-pair loss, chosen reward, rejected reward) for policy/reference sequence log-probabilities."""
    beta, eps = d.beta, d.label_smoothing
    if objective == "simpo":
        ac, ar = pc / jnp.maximum(counts_c, 1), pr / jnp.maximum(counts_r, 1)
        z = beta * (ac - ar) - d.simpo_gamma
        loss = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
        return loss, beta * ac, beta * ar
    if objective == "orpo":  # the odds-ratio term; the chosen responses' next-token loss is added per batch
        ac, ar = (jnp.minimum(p / jnp.maximum(c, 1), -1e-6) for p, c in ((pc, counts_c), (pr, counts_r)))
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))  # (ac, ar < 0: an unused pair slot stays finite)
        return -beta * jax.nn.log_sigmoid(log_odds), beta * ac, beta * ar
    chosen, rejected = pc - rc, pr - rr
    delta = chosen - rejected
    if d.loss == "sigmoid":
        loss = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
    elif d.loss == "robust":
        loss = (-(1 - eps) * jax.nn.log_sigmoid(beta * delta) + eps * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    elif d.loss == "hinge":
        loss = jax.nn.relu(1 - beta * delta)
    else:  # ipo: log-ratios averaged over each response's tokens
        ipo = chosen / jnp.maximum(counts_c, 1) - rejected / jnp.maximum(counts_r, 1)
        loss = (ipo - 1 / (2 * beta)) ** 2
    return loss, beta * chosen, beta * rejected


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - e^x)`` for x < 0, stable on both sides of -ln 2."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def make_reference_logps(model: Llama, a: Arch, seq_len: int, pairs_per_row: int, reference: str,
                         loss_chunk: int = 0) -> Callable:
    """``fn(params, batch, reference_params) -> [rows, 2 * pairs]`` sequence log-probabilities of the
    reference: ``base`` (``params`` without its adapters) or ``separate`` (``reference_params``)."""
    chunk = loss_chunk_size(seq_len, a.vocab_size, loss_chunk)
    # base: the policy's frozen tree without adapters (QLoRA: still quantized); separate: a float tree
    ref_arch = dataclasses.replace(a, lora_rank=0, lora_dropout=0.0,
                                   **({} if reference == "base" else {"quantize": "none"}))
    ref_model = model.clone(a=ref_arch)

    def fn(params, batch, reference_params=None):
        tree = lora.split(params)[1] if reference == "base" else reference_params
        return _logps(ref_model, ref_arch, jax.lax.stop_gradient(tree), batch, None, chunk, pairs_per_row)[0]

    return fn


def _logps(m: Llama, arch: Arch, params: Any, batch: dict, rng: Any, chunk: int,
           pairs_per_row: int) -> tuple[jax.Array, jax.Array]:
    hidden = m.apply({"params": model_params(params, arch)}, batch["tokens"], batch["positions"],
                     batch["segment_ids"], method=Llama.hidden, rngs=None if rng is None else {"dropout": rng})
    nll = chunked_token_nll(hidden, head_kernel(params, arch), batch["targets"], chunk, arch.dtype)
    return sequence_sums(-nll, batch, pairs_per_row)


def make_preference_loss_fn(model: Llama, a: Arch, seq_len: int, d: Any, objective: str, pairs_per_row: int,
                            reference: str, loss_chunk: int = 0) -> Callable:
    """``loss_fn(params, batch, rng, reference_params) -> (loss_sum, (n_pairs, sums))`` (see
    :func:`jaxllama.program.step.make_loss_fn`). ``reference``: ``base`` (the adapters of ``params``
    left out), ``separate`` (``reference_params``), ``cached`` (``batch["ref_logps"]``), or none (SimPO, ORPO)."""
    chunk = loss_chunk_size(seq_len, a.vocab_size, loss_chunk)
    ref_fn = make_reference_logps(model, a, seq_len, pairs_per_row, reference, loss_chunk) \
        if reference in ("base", "separate") else None

    def loss_fn(params, batch, rng=None, reference_params=None):
        sums, counts = _logps(model, a, params, batch, rng, chunk, pairs_per_row)
        pc, pr, nc, nr = sums[:, 0::2], sums[:, 1::2], counts[:, 0::2], counts[:, 1::2]
        if objective in ("simpo", "orpo"):
            ref = jnp.zeros_like(sums)
        elif reference == "cached":
            ref = batch["ref_logps"]
        else:
            ref = ref_fn(params, batch, reference_params)
        rc, rr = ref[:, 0::2], ref[:, 1::2]
        valid = ((nc > 0) & (nr > 0)).astype(F32)  # padding rows and unused pair slots count for nothing
        loss, r_c, r_r = pair_loss(pc, pr, nc, nr, rc, rr, d, objective)
        n = jnp.sum(valid)
        total = lambda x: jnp.sum(jnp.where(valid > 0, x, 0.0))  # noqa: E731
        out = {"loss": total(loss), "tokens": jnp.sum(counts), "reward_chosen": total(r_c),
               "reward_rejected": total(r_r), "reward_accuracy": total((r_c > r_r).astype(F32)),
               "reward_margin": total(r_c - r_r), "logps_chosen": total(pc), "logps_rejected": total(pr)}
        if objective == "orpo":  # + the chosen responses' mean next-token loss, weighted so that /n leaves it
            out["nll_chosen"] = n * -total(pc) / jnp.maximum(total(nc), 1)
            out["loss"] = out["loss"] + out["nll_chosen"]
        return out["loss"], (n, out)

    return loss_fn
