"""EleutherAI's lm-evaluation-harness against `jaxllama serve`: lm-eval's `local-completions` model sends
its own OpenAI completions requests (token-id prompts, echo=True, max_tokens=1, logprobs=1, batches of
several prompts) to a running server, and the log-likelihoods and is_greedy flags it reads back equal
transformers' on the same Hugging Face folder and the same token ids; greedy generate_until texts equal
transformers' greedy tokens, decoded and cut at the stop strings.

Pinned: lm-eval[api]==0.4.13 (the `api` extra brings requests, aiohttp, tenacity, tiktoken). Runs
offline: the tokenizer is the local folder's, the tasks are local YAML files over local jsonl data.
"""

import io
import json
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import random_params
from serve_helpers import running_server
from jaxllama.config import load_config
from jaxllama.convert.common import Extras, ParamsSource
from jaxllama.convert.hf import write_hf
from jaxllama.data.tokenizers import load_tokenizer
from jaxllama.model.llama import Arch

pytestmark = pytest.mark.slow

VOCAB = 384
MAX_LEN = 256  # the debug preset's positions
WORDS = "the quick brown fox jumps over lazy dog hello world test this is a model of text".split()
BATCH = 3  # lm-eval puts 3 prompts in one request (the last generate request holds 1)
GEN_TOKENS = 12
STARTUP_S = 240.0


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random debug model as a Hugging Face folder with a SentencePiece tokenizer.model: jaxllama loads it,
    and transformers' AutoTokenizer converts it (offline) to the same ids."""
    root = tmp_path_factory.mktemp("serve_lmeval")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
    tok_dir = root / "tok"
    tok_dir.mkdir()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2)
    (tok_dir / "tokenizer.model").write_bytes(buf.getvalue())
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", f"model.vocab_size={VOCAB}"]).model
    params = random_params(Arch.from_config(m), seed=0)
    # logit 0 for <unk>, <s> and the 256 byte-fallback pieces: greedy text is words, not lone UTF-8 bytes
    params["lm_head"]["kernel"][:, [0, 1, *range(3, 259)]] = 0.0
    write_hf(ParamsSource(params, m, Extras(tokenizer_dir=tok_dir, bos_token_id=1, eos_token_id=2)), root / "hf")
    return root / "hf"


@pytest.fixture(scope="module")
def reference(hf_dir):
    """transformers (torch, float32) on the same folder: the reference log-probabilities."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    # the converted tokenizer and jaxllama's agree, so the server's text and lm-eval's ids mean the same
    ours = load_tokenizer(str(hf_dir), add_bos=False)
    for s in ("the quick brown fox", "hello world this is a test", " lazy dog"):
        assert tok(s, add_special_tokens=False).input_ids == ours.encode(s), s
    return model, tok


@pytest.fixture(scope="module")
def server(hf_dir):
    """`jaxllama serve` on a free local port, up until /health answers 200; always stopped afterwards."""
    with running_server(hf_dir, "--host", "127.0.0.1", timeout=STARTUP_S) as base:
        yield base, None


# ------------------------------------------------------------------------------------- tasks and data


def greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    gen = out[0, len(ids):].tolist()
    return gen[:gen.index(eos)] if eos is not None and eos in gen else gen


def continuation_text(tok, ids: list[int], gen: list[int]) -> str:
    """The text `gen` adds after `ids` (leading space included), as an OpenAI completion's text."""
    return tok.decode(ids + gen)[len(tok.decode(ids)):]


def write_tasks(root, model, tok):
    """Two local tasks: `jl_mc` (multiple_choice: loglikelihood requests) and `jl_gen` (generate_until).
    Every multiple-choice doc has the model's own greedy continuation as one choice (is_greedy true there);
    one doc has an empty context (lm-eval then conditions on BOS alone)."""
    rng = random.Random(1)
    mc = []
    for i in range(8):
        q = "" if i == 3 else " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        ctx = tok(q, add_special_tokens=False).input_ids if q else [tok.bos_token_id]
        g = greedy(model, ctx, 2, eos=None)
        best = continuation_text(tok, ctx, g) if q else tok.decode(g)
        others = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(2)]
        choices = others[:i % 3] + [best] + others[i % 3:]
        mc.append({"question": q, "choices": choices, "label": i % 3})
    gen_docs = [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))), "answer": "x"}
                for _ in range(4)]
    # a stop string that the greedy text of the first prompt contains past its start: the server must cut there
    first = tok(gen_docs[0]["question"], add_special_tokens=False).input_ids
    text0 = continuation_text(tok, first, greedy(model, first, GEN_TOKENS, tok.eos_token_id))
    stop = next((text0[k:k + 2] for k in range(3, len(text0) - 1) if text0[k:k + 2].strip()), "zz")
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen_docs))
    cache = str(root / "hf_datasets_cache")
    common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "{{question}}"}
    (root / "jl_mc.yaml").write_text(yaml.safe_dump({
        "task": "jl_mc", **common,
        "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}, "cache_dir": cache},
        "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "label",
        "target_delimiter": "", "metric_list": [{"metric": "acc"}]}))
    (root / "jl_gen.yaml").write_text(yaml.safe_dump({
        "task": "jl_gen", **common,
        "dataset_kwargs": {"data_files": {"test": str(root / "gen.jsonl")}, "cache_dir": cache},
        "output_type": "generate_until", "doc_to_target": "answer",
        "generation_kwargs": {"until": [stop], "max_gen_toks": GEN_TOKENS, "do_sample": False, "temperature": 0},
        "metric_list": [{"metric": "exact_match"}]}))
    return stop


# ------------------------------------------------------------------------------------------------ test


def test_lm_eval_local_completions_matches_transformers(hf_dir, reference, server, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    model, tok = reference
    base, _ = server
    stop = write_tasks(tmp_path, model, tok)
    model_args = {"model": str(hf_dir), "base_url": f"{base}/v1/completions", "tokenizer_backend": "huggingface",
                  "tokenized_requests": True, "batch_size": BATCH, "num_concurrent": 1, "max_retries": 1,
                  "max_length": MAX_LEN, "timeout": 120}
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=["jl_mc", "jl_gen"], log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),  # (defaults: +9 s)
            bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    except Exception as e:  # the server's side of the story is in its log
        raise AssertionError(f"lm-eval failed: {e!r} (the server's log: $TMPDIR/jaxllama-serve-PORT.log)")

    # lm-eval's own tokenization of each (context, continuation) pair, as its local-completions model does it
    lm = LocalCompletionsAPI(**{**model_args, "base_url": None})

    def encode(ctx: str, cont: str) -> tuple[list[int], list[int]]:
        if ctx == "":
            c = lm.tok_encode(cont, add_special_tokens=False)
            return ([lm.prefix_token_id], c) if lm.prefix_token_id != c[0] else (c[:1], c[1:])
        return lm._encode_pair(ctx, cont)

    # ---- loglikelihood: every choice of every doc, against transformers on the same ids
    samples = out["samples"]["jl_mc"]
    assert len(samples) == 8
    got, want, got_greedy, want_greedy, eos_next = [], [], [], [], []
    for s in samples:
        assert len(s["arguments"]) == 3 and len(s["resps"]) == 3
        for (ctx, cont), resp, filt in zip(s["arguments"], s["resps"], s["filtered_resps"]):
            ll, is_greedy = resp[0]
            assert (float(filt[0]), bool(filt[1])) == (float(ll), bool(is_greedy))
            c, x = encode(ctx, cont)
            ids = c + x
            assert 0 < len(c) and len(x) > 0 and len(ids) <= MAX_LEN - 1
            with torch.no_grad():
                lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            pos = range(len(c), len(ids))
            want.append(sum(float(lp[j - 1, ids[j]]) for j in pos))
            want_greedy.append(all(int(lp[j - 1].argmax()) == ids[j] for j in pos))
            eos_next.append(int(lp[-1].argmax()) == tok.eos_token_id)
            got.append(float(ll))
            got_greedy.append(bool(is_greedy))
    bad = [(i, g, w, e) for i, (g, w, e) in enumerate(zip(got, want, eos_next)) if not abs(g - w) <= 1e-4]
    assert not bad, f"(request, lm-eval's log-likelihood, transformers', EOS is the max_tokens=1 token): {bad}"
    assert got_greedy == want_greedy
    assert sum(want_greedy) >= 4  # the greedy choices really are greedy, so the flag is tested both ways
    # lm-eval drops the last logprob as the max_tokens=1 token: it must be there even when that token is EOS
    assert any(eos_next)
    acc = np.mean([int(np.argmax([float(r[0][0]) for r in s["resps"]]) == s["target"]) for s in samples])
    assert out["results"]["jl_mc"]["acc,none"] == pytest.approx(acc)

    # ---- generate_until: greedy (temperature 0) texts, cut before the first stop string
    gens = out["samples"]["jl_gen"]
    assert len(gens) == 4
    cut = 0
    for s in gens:
        [(ctx, gen_kwargs)] = s["arguments"]
        ids = lm.tok_encode(ctx)
        want_text = continuation_text(tok, ids, greedy(model, ids, GEN_TOKENS, tok.eos_token_id))
        hits = [want_text.index(t) for t in (stop, tok.eos_token) if t in want_text]
        if hits:
            want_text, cut = want_text[:min(hits)], cut + 1
        assert s["resps"][0][0] == want_text, (ctx, s["resps"][0][0], want_text)
    assert cut >= 1  # the stop string really was hit
