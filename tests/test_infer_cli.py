"""`jaxllama generate` / `jaxllama eval` end to end: a random model saved as a Hugging Face folder with a
real SentencePiece tokenizer, run through the CLI, checked against transformers and direct computation."""

import io
import json
import math
import os
import random
import re

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from helpers import random_params
from jaxllama.cli import main
from jaxllama.config import load_config
from jaxllama.convert.common import Extras, ParamsSource
from jaxllama.convert.hf import write_hf
from jaxllama.data.sources import make_source
from jaxllama.data.tokenizers import load_tokenizer
from jaxllama.errors import ConfigError
from jaxllama.data.chat_format import chat_prompt, llama2_prompt, llama3_prompt, messages_for, render_jinja
from jaxllama.infer.sampling import Sampling
from jaxllama.model.llama import Arch, Llama

VOCAB = 300
WORDS = "the quick brown fox jumps over lazy dog hello world test this is a model of text".split()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random debug model as a Hugging Face folder, with a SentencePiece tokenizer of the same size."""
    root = tmp_path_factory.mktemp("infer_cli")
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
    write_hf(ParamsSource(params, m, Extras(tokenizer_dir=tok_dir, bos_token_id=1, eos_token_id=2)), root / "hf")
    return root / "hf"


def run_json(capsys, *argv):
    capsys.readouterr()
    assert main(["generate", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_greedy_cli_matches_transformers(hf_dir, capsys):
    prompt = "the quick brown fox"
    [row] = run_json(capsys, str(hf_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "10")
    tok = load_tokenizer(str(hf_dir))
    ids = tok.encode(prompt)
    assert row["prompt_tokens"] == len(ids) and len(row["tokens"]) == 10 and row["finish_reason"] == "length"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        gen = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        logits = hf(gen).logits[0].log_softmax(-1)
    assert row["tokens"] == gen[0, len(ids):].tolist()
    want_lp = [float(logits[len(ids) - 1 + i, t]) for i, t in enumerate(row["tokens"])]
    np.testing.assert_allclose(row["logprobs"], want_lp, atol=1e-4)
    assert row["text"] == tok.decode(row["tokens"])
    # the streamed plain-text output is the same text; sharded over 4 devices, the same tokens
    assert main(["generate", str(hf_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "10",
                 "--chunk", "3"]) == 0
    assert capsys.readouterr().out == row["text"] + "\n"
    [sharded] = run_json(capsys, str(hf_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "10",
                         "--mesh", "data=2,tensor=2")
    assert sharded["tokens"] == row["tokens"]


def test_prompt_file_n_and_seed(hf_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("hello world\n\nthe lazy dog is\n")
    args = [str(hf_dir), "--prompt-file", str(tmp_path / "prompts.txt"), "--n", "2", "--temperature", "1",
            "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.2", "--seed", "5",
            "--max-new-tokens", "8"]
    rows = run_json(capsys, *args)
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[1]["prompt"] == "hello world" and rows[2]["prompt"] == "the lazy dog is"
    assert rows[0]["tokens"] != rows[1]["tokens"]  # two samples of one prompt differ
    assert run_json(capsys, *args) == rows  # same seed, same samples
    single = run_json(capsys, *args[:1], "--prompt", "hello world", *args[3:])
    # a row's draws do not depend on the rest of the batch
    assert [r["tokens"] for r in single] == [rows[0]["tokens"], rows[1]["tokens"]]
    assert run_json(capsys, *args[:-4], "--seed", "6", *args[-2:]) != rows
    # plain output: each row under its header, in order
    assert main(["generate", *args]) == 0
    out = capsys.readouterr().out
    for r in rows:
        assert f"--- prompt {r['prompt_index'] + 1}, sample {r['sample'] + 1}\n{r['text']}\n" in out


def test_stop_string_cuts_text(hf_dir, capsys):
    base = [str(hf_dir), "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "16"]
    [full] = run_json(capsys, *base)
    text = full["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2] not in text[:i + 1])
    [cut] = run_json(capsys, *base, "--stop", stop)
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    assert cut["tokens"] == full["tokens"][:len(cut["tokens"])] and len(cut["tokens"]) < len(full["tokens"])
    assert main(["generate", *base, "--stop", stop]) == 0
    assert capsys.readouterr().out == text[:text.index(stop)] + "\n"


def test_chat_formats(hf_dir, capsys):
    msgs = messages_for("Hi there", system="Be brief.")
    assert llama2_prompt(msgs) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]"
    assert llama3_prompt(msgs) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                                   "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # A Jinja template renders exactly as transformers' apply_chat_template renders it
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ours_tok = load_tokenizer(str(hf_dir))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 1, "</s>": 2, "[UNK]": 0},
                                                                                 unk_token="[UNK]")),
                                     bos_token="<s>", eos_token="</s>")
    hf_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    want = hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert render_jinja(template, msgs, ours_tok) == want
    assert chat_prompt(msgs, ours_tok) == llama2_prompt(msgs)  # SentencePiece, no template: Llama 2 format
    [row] = run_json(capsys, str(hf_dir), "--prompt", "Hi there", "--system", "Be brief.", "--chat",
                     "--temperature", "0", "--max-new-tokens", "4")
    assert row["prompt_tokens"] == len(ours_tok.encode(llama2_prompt(msgs), bos=False, special=True))


def reference_nll(hf_dir, overrides, n_batches):
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", f"model.vocab_size={VOCAB}"]).model
    params = random_params(Arch.from_config(m), seed=0)
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.preset=debug", *overrides])
    nll = n = 0.0
    for i, b in zip(range(n_batches), make_source(cfg, split="eval")):
        logits = Llama(Arch.from_config(m)).apply({"params": params}, b["tokens"], b["positions"], b["segment_ids"])
        logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
        picked = np.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
        nll -= float((picked * b["loss_mask"]).sum())
        n += float(b["loss_mask"].sum())
    return nll / n, int(n)


@pytest.mark.parametrize("mesh", ["tensor=1", "data=2,tensor=2"])
def test_eval_cli_matches_direct_nll(hf_dir, capsys, mesh):
    assert main(["eval", str(hf_dir), "--data", "synthetic", "--seq-len", "32", "--batch", "4", "--max-batches",
                 "3", "--mesh", mesh]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want, tokens = reference_nll(hf_dir, ["data.eval_source=synthetic", "data.seq_len=32", "data.global_batch=4"], 3)
    assert result["batches"] == 3 and result["tokens"] == tokens
    assert result["mean_nll"] == pytest.approx(want, abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)


def test_eval_on_text_files(hf_dir, tmp_path, capsys):
    rng = random.Random(1)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(20))})
                                                 + "\n" for _ in range(12)))
    assert main(["eval", str(hf_dir), "--data", str(tmp_path / "eval.jsonl"), "--seq-len", "32", "--batch", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    overrides = [f"data.eval_source={tmp_path / 'eval.jsonl'}", f"data.source={tmp_path / 'eval.jsonl'}",
                 "data.seq_len=32", "data.global_batch=2", f"data.tokenizer={hf_dir}", "data.shuffle=false"]
    want, tokens = reference_nll(hf_dir, overrides, 1000)
    assert result["tokens"] == tokens > 100
    assert result["mean_nll"] == pytest.approx(want, abs=1e-4)


BAD = [
    (["generate", "/nonexistent/model", "--prompt", "x"], "no such file or folder"),
    (["generate", "{hf}", "--prompt", "x", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["generate", "{hf}", "--prompt", "x", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["generate", "{hf}", "--prompt", "x", "--top-k", "-2"], "--top-k: must be >= 0"),
    (["generate", "{hf}", "--prompt", "x", "--min-p", "1.5"], "--min-p: must be in [0, 1)"),
    (["generate", "{hf}", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty: must be > 0"),
    (["generate", "{hf}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["generate", "{hf}", "--prompt", "x", "--n", "0"], "--n: must be >= 1"),
    (["generate", "{hf}", "--prompt", "x", "--mesh", "tensor=3"], "--mesh: tensor=3 does not divide"),
    (["generate", "{hf}", "--prompt", "x", "--mesh", "pipeline=2"], "--mesh: expected"),
    (["generate", "{hf}"], "give a prompt"),
    (["generate", "{hf}", "--prompt-file", "/nonexistent.txt"], "--prompt-file /nonexistent.txt: no such file"),
    (["generate", "{hf}", "--prompt", "{long}"], "prompt 1 has"),
    (["generate", "{hf}", "--prompt", "x", "--tokenizer", "/nonexistent.model"], "no such file"),
    (["eval", "{hf}", "--data", "synthetic", "--batch", "3", "--mesh", "data=2"], "--batch 3: must be divisible"),
    (["eval", "{hf}", "--data", "synthetic", "--seq-len", "4096"], "data.seq_len=4096 exceeds"),
    (["eval", "{hf}", "--data", "synthetic", "data.bogus=1"], "data.bogus"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_one_line(hf_dir, capsys, argv, message):
    long = " ".join(["hello world"] * 200)
    argv = [a.format(hf=hf_dir, long=long) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxllama: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("fmt", ["gguf", "meta", "jaxllama"])
def test_generate_from_every_format(hf_dir, tmp_path, capsys, fmt):
    base = ["--prompt", "the lazy dog", "--temperature", "0", "--max-new-tokens", "6"]
    [want] = run_json(capsys, str(hf_dir), *base)
    dst = tmp_path / ("m.gguf" if fmt == "gguf" else fmt)
    assert main(["convert", str(hf_dir), str(dst), "--to", fmt]) == 0
    extra = [] if fmt == "gguf" else ["--tokenizer", str(hf_dir)]  # GGUF carries its tokenizer
    [got] = run_json(capsys, str(dst), *base, *extra)
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"]


def test_bfloat16_and_no_tensorflow(hf_dir):
    import subprocess
    import sys

    code = ("import sys; from jaxllama.cli import main; "
            f"rc = main(['generate', {str(hf_dir)!r}, '--prompt', 'hello', '--max-new-tokens', '5', '--dtype', "
            "'bfloat16', '--json']); assert rc == 0; assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(row["tokens"]) == 5 and all(lp <= 0 for lp in row["logprobs"])


def test_llama3_chat_is_chosen_for_a_llama3_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = {w: i for i, w in enumerate(specials + ["[UNK]"] + sorted(set(WORDS)))}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(specials)
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|end_of_text|>"}))
    tok = load_tokenizer(str(tmp_path))
    msgs = messages_for("hello world")
    text = chat_prompt(msgs, tok)
    assert text == llama3_prompt(msgs)
    ids = tok.encode(text, bos=False, special=True)
    assert ids[:3] == [vocab["<|begin_of_text|>"], vocab["<|start_header_id|>"], vocab["[UNK]"]]  # "user" unknown
    assert ids.count(vocab["<|eot_id|>"]) == 1 and vocab["<|eot_id|>"] in tok.stop_ids
    with pytest.raises(ConfigError, match="carry no chat template"):
        chat_prompt(msgs, tok, "jinja")


def test_text_streams_in_pieces(hf_dir):
    from jaxllama.infer.generate import generate, load

    loaded = load(str(hf_dir))
    pieces = []
    [row] = generate(loaded, ["hello world"], 12, Sampling(temperature=0), chunk=2, out=pieces.append)
    assert "".join(pieces) == row["text"] + "\n"
    assert len([p for p in pieces if p.strip()]) >= 3  # several updates, not one print at the end


def test_missing_tokenizer_and_binary_prompt_file(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), str(tmp_path / "meta"), "--to", "meta"]) == 0
    (tmp_path / "meta" / "tokenizer.model").unlink()
    assert main(["generate", str(tmp_path / "meta"), "--prompt", "hi"]) == 2
    assert "no tokenizer found beside the model; pass --tokenizer" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not text\n")
    assert main(["generate", str(hf_dir), "--prompt-file", str(tmp_path / "bad.txt")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_two_processes_generate_and_eval_like_one(hf_dir, tmp_path, capsys):
    """2 processes x 4 CPU devices (jax.distributed + gloo) share one mesh; process 0 prints the same."""
    import os
    import subprocess
    import sys

    (tmp_path / "p.txt").write_text("hello world\nthe lazy dog is\nquick brown\n")
    gen = ["generate", str(hf_dir), "--prompt-file", str(tmp_path / "p.txt"), "--temperature", "1", "--seed", "3",
           "--max-new-tokens", "8", "--n", "2", "--stop", "e", "--json", "--mesh", "data=4,tensor=2", "--chunk", "2"]
    ev = ["eval", str(hf_dir), "--data", "synthetic", "--seq-len", "32", "--batch", "8", "--max-batches", "2",
          "--mesh", "data=4,tensor=2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env["JAX_PLATFORMS"] = "cpu"
    for argv in (gen, ev):
        launch = [sys.executable, "-m", "jaxllama.launch.local", "2", "--devices-per-process", "4", "--",
                  sys.executable, "-m", "jaxllama.cli", *argv]
        r = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        two = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        assert not [x for x in r.stdout.splitlines() if x.startswith("[process 1] {")]  # only process 0 prints
        capsys.readouterr()
        assert main(argv) == 0
        one = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        if argv is ev:
            assert two[0]["tokens"] == one[0]["tokens"]
            assert two[0]["mean_nll"] == pytest.approx(one[0]["mean_nll"], abs=1e-5)
        else:
            assert len(two) == 6 and [t["tokens"] for t in two] == [o["tokens"] for o in one]
            assert [t["text"] for t in two] == [o["text"] for o in one]


def test_ctrl_c_during_generate_exits_130_in_one_line(hf_dir):
    """SIGINT while tokens stream: 'jaxllama: interrupted', exit 130 -- never a segfault at teardown
    (the process ends without running the interpreter's shutdown under JAX's threads)."""
    import signal
    import subprocess
    import sys
    import time

    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "jaxllama.cli", "generate", str(hf_dir), "--prompt", "the quick",
                              "--max-new-tokens", "100000", "--n", "4", "--chunk", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
        try:
            os.set_blocking(p.stdout.fileno(), False)
            deadline = time.time() + 120
            while time.time() < deadline and not p.stdout.read(1):  # wait for the first streamed token
                time.sleep(0.2)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:  # never leave a generate running behind a failed check
                p.kill()
                p.wait()
        assert p.returncode == 130, (p.returncode, err[-2000:])
        assert err.strip().splitlines()[-1] == "jaxllama: interrupted", err[-2000:]


def test_generate_says_its_chat_fallback_and_throughput_on_stderr(hf_dir, capsys):
    capsys.readouterr()
    assert main(["generate", str(hf_dir), "--prompt", "the quick", "--chat", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "--chat uses the Llama 2 [INST] format" in err
    assert re.search(r"generated 5 tokens in 1 row\(s\) in [0-9.]+s: [0-9,.]+ tokens/s", err), err
    assert out.endswith("\n") and "tokens/s" not in out  # stdout holds the completion only
