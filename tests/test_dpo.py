"""Preference tuning: DPO losses and rewards equal TRL's ``DPOTrainer`` (and SimPO TRL's ``CPOTrainer``) on
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

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
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
