"""Eval: mean NLL over loss-masked tokens equals a direct log-softmax computation; the loop logs it."""

import json
import math

import jax
import numpy as np

from helpers import random_params
from jaxllama.config import load_config
from jaxllama.data.sources import make_source
from jaxllama.model.llama import Arch, Llama
from jaxllama.program import build_program
from jaxllama.train.evaluate import evaluate
from jaxllama.train.loop import train


def _reference_nll(model, params, batches):
    nll = n = 0.0
    for b in batches:
        logits = model.apply({"params": params}, b["tokens"], b["positions"], b["segment_ids"])
        logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
        picked = np.take_along_axis(np.asarray(logp), b["targets"][..., None], axis=-1)[..., 0]
        nll -= float((picked * b["loss_mask"]).sum())
        n += float(b["loss_mask"].sum())
    return nll / n


def test_eval_matches_a_direct_log_softmax():
    cfg = load_config(None, ["data.source=synthetic",
                             "model.preset=debug", "data.seq_len=32", "data.global_batch=4",
                             "data.eval_source=synthetic", "train.eval_batches=3"])
    a = Arch.from_config(cfg.model)
    model = Llama(a)
    params = random_params(a)
    batches = list(make_source(cfg, split="eval"))
    assert len(batches) == 3
    batches[1]["loss_mask"][:, 10:] = 0  # masked tokens must not count
    program = build_program(cfg, jax.devices()[:1])
    got = evaluate(program.eval_step, params, batches, program.batch.to_global, lambda: None)
    want = _reference_nll(model, params, batches)
    assert got["eval_batches"] == 3 and got["eval_tokens"] == int(sum(b["loss_mask"].sum() for b in batches))
    np.testing.assert_allclose(got["eval_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(got["eval_ppl"], math.exp(want), rtol=1e-4)


def test_training_logs_eval_loss(tmp_path):
    cfg = load_config(None, ["data.source=synthetic",
                             "model.preset=debug", "data.seq_len=32", "data.global_batch=8", "train.steps=6",
                             "train.log_every=2", "train.eval_every=3", "data.eval_source=synthetic",
                             "train.eval_batches=2", f"run_dir={tmp_path}", "checkpoint.enabled=false"])
    train(cfg, out=lambda _: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 6]  # eval at 3 is logged with the next record; and at the end
    assert all(r["eval_batches"] == 2 and np.isfinite(r["eval_loss"]) for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 0.5
