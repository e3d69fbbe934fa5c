"""Preference tuning: DPO losses and rewards equal TRL's ``DPOTrainer`` (SimPO TRL's ``CPOTrainer``, ORPO its
``ORPOTrainer``) on
the same weights and tokens; pairs pack whole; the reference is the frozen base without adapters or a
separate checkpoint; ``jaxllama train train.objective=dpo`` works from the CLI, resumes exactly, and
bad preference records are one-line errors naming file:line."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllama.config import load_config
from jaxllama.data.packing import Packer
from jaxllama.data.preference import PreferenceEncoder, preference_encoder
from jaxllama.data.chat_data import BadRecord
from jaxllama.model.llama import Arch, Llama
from jaxllama.program.preference import make_preference_loss_fn

import torch  # noqa: E402 (the test extra installs torch and trl: these are references, never skipped)
import trl  # noqa: F401
PAIRS = [{"prompt": "the cat sat", "chosen": " yes good", "rejected": " no bad answer"},
         {"prompt": "dog ran", "chosen": " good", "rejected": " bad is bad"},
         {"prompt": "the mat", "chosen": " is good answer", "rejected": " is bad"}]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny HF Llama policy and a different reference (random), a word-level tokenizer, TRL's batch."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate("<pad> <s> </s> the cat sat on mat dog ran yes no good bad answer is".split())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    policy, ref = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("dpo")
    policy.save_pretrained(d / "policy")
    ref.save_pretrained(d / "ref")
    return d, policy, ref, tok, Dataset.from_list(PAIRS)


def trl_metrics(hf_pair, **kw):
    from trl import DPOConfig, DPOTrainer

    d, policy, ref, tok, data = hf_pair
    args = DPOConfig(output_dir=str(d / "trl"), report_to=[], per_device_train_batch_size=len(PAIRS), max_length=64,
                     bf16=False, use_cpu=True, **kw)
    tr = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(len(PAIRS))])
    loss = float(tr.compute_loss(policy, batch))
    m = {k: v[-1] for mode in ("train", "eval") for k, v in tr._metrics[mode].items() if v}
    return batch, loss, m


def jax_batch(trl_batch, seq_len=32, pairs_per_row=2):
    """TRL's padded [chosen..., rejected...] rows -> our packed rows (the same tokens and completion masks)."""
    ids, att, comp = (trl_batch[k].numpy() for k in ("input_ids", "attention_mask", "completion_mask"))
    n = ids.shape[0] // 2
    packer = Packer(seq_len, max_segments=2 * pairs_per_row)
    for i in range(n):
        sides = [(ids[j][att[j] == 1], comp[j][att[j] == 1]) for j in (i, n + i)]
        packer.add_pair(*sides[0], *sides[1])
    packer.flush()
    return {k: jax.numpy.asarray(v) for k, v in packer.pop(len(packer.ready)).items()}


def jax_loss(hf_pair, batch, objective="dpo", **dpo):
    from jaxllama.convert.api import load_model

    d = hf_pair[0]
    pol, ref = load_model(str(d / "policy")), load_model(str(d / "ref"))
    arch = Arch.from_config(pol.model_cfg)
    cfg = load_config(None, [f"train.dpo.{k}={v}" for k, v in dpo.items()])
    fn = make_preference_loss_fn(Llama(arch), arch, batch["tokens"].shape[1], cfg.train.dpo, objective, 2,
                                 "separate" if objective == "dpo" else "none")
    _, (n, sums) = jax.jit(fn)(pol.params, batch, None, ref.params)
    return {k: float(v / n) for k, v in sums.items() if k != "tokens"}


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("hinge", {}), ("ipo", {}),
                                         ("robust", {"label_smoothing": 0.2})])
def test_dpo_loss_and_rewards_equal_trl(hf_pair, loss, extra):
    batch, trl_loss, m = trl_metrics(hf_pair, beta=0.5, loss_type=[loss], **extra)
    ours = jax_loss(hf_pair, jax_batch(batch), beta=0.5, loss=loss, **extra)
    np.testing.assert_allclose(ours["loss"], trl_loss, rtol=1e-5, atol=1e-6)
    for key, theirs in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                        ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                        ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
        np.testing.assert_allclose(ours[key], m[theirs], rtol=1e-5, atol=1e-6, err_msg=key)


def trl_reference_free(hf_pair, trainer_cls, **fields):
    """TRL's batch, its completion labels, the policy's logits, TRL's per-token average log-probabilities
    ([chosen..., rejected...]) and a bare ``trainer_cls`` holding ``fields`` (its loss methods need no more)."""
    from types import SimpleNamespace

    batch, _, _ = trl_metrics(hf_pair, beta=0.5)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = hf_pair[1](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    avg = trainer_cls.get_batch_logps(logits, labels, average_log_prob=True)
    trainer = object.__new__(trainer_cls)
    trainer.__dict__.update(accelerator=SimpleNamespace(device="cpu"), **fields)
    return batch, labels, logits, avg, trainer


def test_simpo_equals_trl_cpo(hf_pair):
    """SimPO: TRL's CPOTrainer (loss_type=simpo, cpo_alpha=0) on log-probabilities TRL computes from the policy."""
    from trl.experimental.cpo import CPOTrainer

    batch, _, _, avg, cpo = trl_reference_free(hf_pair, CPOTrainer, alpha=0.0, beta=2.0, loss_type="simpo",
                                               simpo_gamma=0.3, label_smoothing=0.1)
    n = len(PAIRS)
    losses, r_c, r_r = cpo.cpo_loss(avg[:n], avg[n:])
    ours = jax_loss(hf_pair, jax_batch(batch), objective="simpo", beta=2.0, simpo_gamma=0.3, label_smoothing=0.1)
    np.testing.assert_allclose(ours["loss"], float(losses.mean()), rtol=1e-5)
    np.testing.assert_allclose(ours["reward_chosen"], float(r_c.mean()), rtol=1e-5)
    np.testing.assert_allclose(ours["reward_rejected"], float(r_r.mean()), rtol=1e-5)


def test_orpo_equals_trl_orpo(hf_pair):
    """ORPO: TRL's ORPOTrainer.odds_ratio_loss on TRL's averaged log-probabilities, plus the chosen responses'
    cross-entropy (token mean over the batch; ours covers the response tokens, see program/preference.py)."""
    from trl.experimental.orpo import ORPOTrainer

    batch, labels, logits, avg, orpo = trl_reference_free(hf_pair, ORPOTrainer, beta=0.3)
    n = len(PAIRS)
    losses, r_c, r_r, _, _ = orpo.odds_ratio_loss(avg[:n], avg[n:])
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1))
    ours = jax_loss(hf_pair, jax_batch(batch), objective="orpo", beta=0.3)
    np.testing.assert_allclose(ours["loss"], float(nll - losses.mean()), rtol=1e-5)
    np.testing.assert_allclose(ours["nll_chosen"], float(nll), rtol=1e-5)
    np.testing.assert_allclose(ours["reward_chosen"], float(r_c.mean()), rtol=1e-5)
    np.testing.assert_allclose(ours["reward_rejected"], float(r_r.mean()), rtol=1e-5)
    np.testing.assert_allclose(ours["reward_accuracy"], float((r_c > r_r).float().mean()), rtol=1e-6)


# ------------------------------------------------------------------------------------------- data

class WordTok:
    """Enough of a tokenizer for the encoder: one id per character, BOS 1, EOS 2."""
    bos_id, eos_id, pad_id, add_bos, chat_template = 1, 2, 0, True, None

    def encode_offsets(self, text, special=False):
        return [3 + ord(c) % 50 for c in text], list(range(len(text))), list(range(1, len(text) + 1))

    def _need(self, value, what):
        return value


def encoder(seq_len=64, truncate="right"):
    from jaxllama.data.chat_data import ChatEncoder

    chat = object.__new__(ChatEncoder)  # skip the template check: plain text and messages never reach it here
    chat.__dict__.update(tok=WordTok(), fmt="prompt_completion", loss_on="assistant", template="llama3",
                         truncate="right", seq_len=0, add_bos=True, truncated=0, dropped=0)
    return PreferenceEncoder(chat, seq_len, truncate)


def test_pairs_are_masked_on_the_responses_and_fit_a_row():
    (c_ids, c_mask), (r_ids, r_mask) = encoder()({"prompt": "ab", "chosen": "cd", "rejected": "efg"})
    assert c_ids.tolist()[0] == 1 and c_ids.tolist()[-1] == 2 and r_ids.size == 1 + 2 + 3 + 1
    assert c_mask.tolist() == [0, 0, 0, 1, 1, 1] and r_mask.tolist() == [0, 0, 0, 1, 1, 1, 1]
    enc = encoder(seq_len=8)  # 5 + 6 positions > 8: each side cut to half a row + 1 token
    (c, cm), (r, rm) = enc({"prompt": "ab", "chosen": "cd", "rejected": "efg"})
    assert (c.size, r.size, enc.truncated) == (5, 5, 1) and (c.size - 1) + (r.size - 1) <= 8
    assert encoder(seq_len=8, truncate="drop")({"prompt": "ab", "chosen": "cd", "rejected": "efg"}) is None
    with pytest.raises(BadRecord, match="cut away"):
        encoder(seq_len=4)({"prompt": "abcdef", "chosen": "x", "rejected": "y"})


def test_bad_preference_records():
    enc = encoder()
    for record, match in [({"prompt": "a", "chosen": "b"}, "no key 'rejected'"),
                          ({"prompt": "a", "chosen": "", "rejected": "c"}, "'chosen' is empty"),
                          ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical"),
                          ({"chosen": "b", "rejected": "c"}, "give \"prompt\""),
                          ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
                           "share no first message"),
                          ([1], "JSON object")]:
        with pytest.raises(BadRecord, match=match):
            enc(record)


def test_implicit_prompt_is_the_shared_prefix(monkeypatch):
    seen = []
    enc = encoder()
    monkeypatch.setattr(type(enc.chat), "__call__", lambda self, rec: seen.append(rec) or (np.zeros(3, np.int32),
                                                                                          np.ones(3, np.uint8)))
    user = {"role": "user", "content": "q"}
    enc({"chosen": [user, {"role": "assistant", "content": "yes"}], "rejected": [user, {"role": "assistant", "content": "no"}]})
    assert seen[0]["prompt"] == [user] and seen[0]["completion"] == [{"role": "assistant", "content": "yes"}]
    assert seen[1]["completion"] == [{"role": "assistant", "content": "no"}]


def test_packer_keeps_pairs_whole_in_segment_order():
    packer = Packer(10, max_segments=4)
    rng = np.random.default_rng(0)
    for _ in range(12):
        a, b = rng.integers(2, 5, 2)
        packer.add_pair(np.arange(a), np.ones(a), np.arange(b) + 10, np.ones(b))
    packer.flush()
    batch = packer.pop(len(packer.ready))
    for row in batch["segment_ids"]:
        segs = [s for s in np.unique(row) if s]
        assert len(segs) % 2 == 0 and segs == list(range(1, len(segs) + 1)) and len(segs) <= 4
    with pytest.raises(ValueError, match="does not fit"):
        packer.add_pair(np.arange(8), np.ones(8), np.arange(5), np.ones(5))


# ------------------------------------------------------------------------------------------- training

QUIET = ["train.tensorboard=false", "train.progress=false"]


@pytest.fixture(scope="module")
def pref_data(hf_pair):
    d, _, _, tok, _ = hf_pair
    tok.save_pretrained(d / "policy")
    rng = np.random.default_rng(0)
    words = "the cat sat on mat dog ran".split()
    pick = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    lines = [json.dumps({"prompt": pick(3), "chosen": " yes " + pick(2), "rejected": " no " + pick(2)}) for _ in range(24)]
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return d


def dpo_cfg(d, *extra):
    from jaxllama.train.init_from import load_train_config

    return load_train_config(None, [f"train.init_from={d / 'policy'}", f"data.source={d / 'pairs.jsonl'}",
                                    "data.format=preference", "train.objective=dpo", "data.seq_len=32",
                                    "data.global_batch=8", "optim.lr=1e-2", "optim.warmup_steps=0", *QUIET, *extra])


def test_lora_dpo_reference_is_the_base_without_adapters(pref_data, tmp_path):
    """reference=base equals reference=separate given the base weights; only adapters change; the first
    loss is log 2 (zero delta: policy = reference); rewards separate the pairs after training."""
    from jaxllama.train.loop import Trainer, train

    cfg = dpo_cfg(pref_data, "train.lora.rank=4", "train.steps=12", "train.log_every=1", f"run_dir={tmp_path / 'r'}")
    out = train(cfg, out=lambda _: None)
    hist = out["history"]
    np.testing.assert_allclose(hist[0]["loss"], np.log(2), rtol=1e-4)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["reward_accuracy"] >= 0.75
    assert {"reward_chosen", "reward_rejected", "reward_margin", "logps_chosen", "logps_rejected"} <= set(hist[-1])
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "reward_accuracy" in rows[-1]
    # base vs separate on one batch, with non-zero adapters
    base = Trainer.build(dpo_cfg(pref_data, "train.lora.rank=4"), devices=jax.devices()[:1])
    base.initialize(lambda s: None)
    sep = Trainer.build(dpo_cfg(pref_data, "train.lora.rank=4", "train.dpo.reference=separate"),
                        devices=jax.devices()[:1])
    params = jax.tree.map(lambda x: x + 0.05, base.state.params)
    from jaxllama.data.sources import make_source

    src = make_source(base.cfg)
    batch = base.global_batch(next(src))
    src.close()
    m1 = jax.jit(base.program.loss_fn)(base.state.replace(params=params).model_tree(), batch)[1]
    m2 = jax.jit(sep.program.loss_fn)(sep.state.replace(params=params, frozen=base.state.frozen).model_tree(), batch,
                                      None, sep.state.reference)[1]
    for k in m1[1]:
        np.testing.assert_allclose(m1[1][k], m2[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
    # a step moves the adapters only: the frozen base and the separate reference come out unchanged
    frozen, ref = jax.tree.map(np.array, base.state.frozen), jax.tree.map(np.array, sep.state.reference)
    before = jax.tree.map(np.array, base.state.params)
    state, _ = base.program.train_step(base.state, batch)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)))
    state, _ = sep.program.train_step(sep.state, batch)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state.reference)):
        np.testing.assert_array_equal(a, b)


def test_separate_reference_full_dpo_resumes_exactly(pref_data, tmp_path):
    from jaxllama.train.loop import train

    extra = ["optim.schedule=constant", "train.log_every=1", "train.grad_accum=2", "data.global_batch=16"]
    quiet = lambda _: None  # noqa: E731
    straight = train(dpo_cfg(pref_data, "train.steps=6", f"run_dir={tmp_path / 'a'}", *extra), out=quiet)
    train(dpo_cfg(pref_data, "train.steps=3", f"run_dir={tmp_path / 'b'}", *extra), out=quiet)
    resumed = train(dpo_cfg(pref_data, "train.steps=6", f"run_dir={tmp_path / 'b'}", *extra), out=quiet)
    assert resumed["resumed_from"] == 3
    np.testing.assert_allclose(straight["history"][0]["loss"], np.log(2), rtol=1e-4)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"][3:]]
    assert [h["reward_margin"] for h in resumed["history"]] == [h["reward_margin"] for h in straight["history"][3:]]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxllama.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_simpo_orpo_and_bad_inputs(pref_data, tmp_path):
    d = pref_data
    common = [f"train.init_from={d / 'policy'}", "data.format=preference", "data.seq_len=32", "data.global_batch=8",
              "train.steps=2", *QUIET]
    for objective in ("simpo", "orpo"):
        ok = run_cli("train", *common, f"data.source={d / 'pairs.jsonl'}", f"train.objective={objective}",
                     "train.log_every=1", f"run_dir={tmp_path / objective}")
        assert ok.returncode == 0, ok.stderr[-2000:]
        logged = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in logged if "reward_accuracy" in m]
        assert len(steps) == 2 and all(np.isfinite(m["loss"]) for m in steps), logged
        assert ("nll_chosen" in steps[0]) == (objective == "orpo")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "the", "chosen": " yes", "rejected": " yes"}) + "\n")
    for extra, match in [([f"data.source={bad}", "train.objective=dpo"], f"{bad}:1"),
                         ([f"data.source={d / 'pairs.jsonl'}", "train.objective=lm"], "train.objective=lm"),
                         ([f"data.source={d / 'pairs.jsonl'}", "train.objective=dpo", "train.dpo.reference=base"],
                          "train.dpo.reference=base"),
                         ([f"data.source={d / 'pairs.jsonl'}", "train.objective=dpo", "train.dpo.loss=kto"],
                          "train.dpo.loss"),
                         ([f"data.source={d / 'pairs.jsonl'}", "train.objective=orpo", "train.dpo.label_smoothing=0.1"],
                          "train.dpo.label_smoothing")]:
        r = run_cli("train", *common, *extra, f"run_dir={tmp_path / 'x'}")
        assert r.returncode != 0 and match in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert len(r.stderr.strip().splitlines()) <= 3, r.stderr


def test_cached_reference_equals_the_live_one_and_is_reused(pref_data, tmp_path):
    """reference=cached trains exactly like reference=base (the table holds the same values the live
    reference computes), and a resumed run reads the table instead of recomputing it."""
    from jaxllama.train.loop import train

    extra = ["train.lora.rank=4", "optim.schedule=constant", "train.log_every=1"]
    live = train(dpo_cfg(pref_data, *extra, "train.steps=4", f"run_dir={tmp_path / 'live'}"), out=lambda _: None)
    said: list[str] = []
    train(dpo_cfg(pref_data, *extra, "train.dpo.reference=cached", "train.steps=2", f"run_dir={tmp_path / 'c'}"),
          out=said.append)
    assert any("computed in" in s for s in said) and (tmp_path / "c" / "reference_logps.npz").exists()
    said.clear()
    cached = train(dpo_cfg(pref_data, *extra, "train.dpo.reference=cached", "train.steps=4", f"run_dir={tmp_path / 'c'}"),
                   out=said.append)
    assert any("read from" in s for s in said) and not any("computed in" in s for s in said)
    for a, b in zip(live["history"][2:], cached["history"]):
        np.testing.assert_allclose([b["loss"], b["reward_margin"]], [a["loss"], a["reward_margin"]], rtol=1e-5, atol=1e-7)


def test_data_inspect_shows_both_sides(pref_data):
    r = run_cli("data", "inspect", f"data.source={pref_data / 'pairs.jsonl'}", "data.format=preference",
                f"data.tokenizer={pref_data / 'policy'}")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "chosen:" in r.stdout and "rejected:" in r.stdout and "[[" in r.stdout
