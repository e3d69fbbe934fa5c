"""Tokenizers: SentencePiece training/round trips, Llama 3 tiktoken and HF tokenizer.json against independent
references (Hugging Face `tokenizers`/`transformers`), detection, tf.data mapping, caching, the CLI verb, and
each bad input."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from jaxllama.data import tokenizer_train
from jaxllama.data.tokenizers import (HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                                      cached_stdlib_tokenizer, load_tokenizer, tf_tokenize, train_sentencepiece)
from jaxllama.errors import ConfigError

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
CODE = "def main():\n    return 0"
# Varied text: code, unicode (accents, CJK, emoji, RTL), digit runs, whitespace runs, CRLF, contractions and
# special-token strings typed as ordinary text.
SAMPLES = [
    CODE,
    "Hello, world! It's 2024; we've 1234567 reasons.",
    "naïve café — 日本語のテキスト 🦙🚀 עברית   tabs\tand\r\nCRLF\n\n\n  trailing   ",
    "    indented\n\t\tdeeper\n" + " " * 40 + "x",
    "<|begin_of_text|>user said <|eot_id|> and <s> </s> literally",
    "",
    "3.14159 0x1F 1e-9 10,000,000 12345 6789012 2024-11-28",
]
# Meta's Llama 3.1 special-token list, written out independently of the code under test.
META_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                 + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)])
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def corpus_texts(n_files=40):
    from jaxllama.data.corpus import stdlib_files

    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:n_files]]
    numbers = " ".join(str(i * 7919 % 10**7) for i in range(3000))  # so digit merges (up to 3) are learned
    return texts + SAMPLES * 20 + [numbers]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    return train_sentencepiece(corpus_texts(), 600, str(path))


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory):
    """A small Llama-3-style byte-level BPE trained with `tokenizers`, written in Meta's tiktoken format."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus_texts(), trainer)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    with open(path, "w") as f:
        for rank, (token, _) in enumerate(vocab):
            f.write(f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}\n")
    return str(path)


@pytest.fixture(scope="module")
def reference(tiktoken_path):
    """transformers' own tiktoken -> tokenizers conversion of the same file: the independent reference."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter(vocab_file=tiktoken_path, extra_special_tokens=META_SPECIALS).converted()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, reference):
    """A Llama-3-style HF folder: tokenizer.json (BOS added by the post-processor) + tokenizer_config.json."""
    from tokenizers import processors

    bos = reference.token_to_id("<|begin_of_text|>")
    reference.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", bos)])
    folder = tmp_path_factory.mktemp("hf")
    reference.save(str(folder / "tokenizer.json"))
    reference.post_processor = processors.ByteLevel(trim_offsets=False)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


# ------------------------------------------------------------------------------------------ SentencePiece

def test_sentencepiece_training_follows_the_llama_recipe(sp_path):
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    assert sp.get_piece_size() == 600
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.piece_to_id("<0x0A>") > 3  # byte fallback pieces exist
    tok = load_tokenizer(sp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.kind == "sentencepiece" and tok.vocab_size == 600
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, 3, frozenset({2}))
    assert tok.special_ids() == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    assert tok.chat_template is None


@pytest.mark.parametrize("text", SAMPLES + ["never seen: ☃ ∮ 𝔘 \x00\x7f"])
def test_sentencepiece_round_trips_exactly_without_unk(sp_path, text):
    tok = load_tokenizer(sp_path)
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    assert 0 not in ids  # byte fallback: nothing maps to <unk>
    assert tok.decode(tok.encode(text)) == text  # the BOS control piece decodes to nothing


def test_sentencepiece_bos_eos_rules(sp_path):
    tok = load_tokenizer(sp_path)
    plain = spm.SentencePieceProcessor(model_file=sp_path).encode("hello there", out_type=int)
    assert tok.encode("hello there") == [1] + plain  # Llama 1/2 documents: BOS on, EOS off
    assert tok.encode("hello there", bos=False, eos=True) == plain + [2]
    forced = load_tokenizer(sp_path, add_bos=False, add_eos=True)
    assert (forced.add_bos, forced.add_eos) == (False, True) and forced.encode("hello there") == plain + [2]
    assert tok.encode_batch(["hello there", ""]) == [plain, []]
    # Control strings typed in text stay text; special=True parses them.
    assert 1 not in tok.encode("<s>", bos=False) and tok.encode("<s>x</s>", bos=False, special=True)[0] == 1


def test_sentencepiece_training_is_deterministic(tmp_path):
    a = train_sentencepiece(corpus_texts(20), 400, str(tmp_path / "a.model"), max_sentences=3000)
    b = train_sentencepiece(corpus_texts(20), 400, str(tmp_path / "b.model"), max_sentences=3000)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp files left


# --------------------------------------------------------------------------------------- Llama 3 tiktoken

def test_tiktoken_detected_with_meta_special_ids(tiktoken_path):
    n = sum(1 for line in open(tiktoken_path) if line.strip())
    tok = load_tokenizer(tiktoken_path)
    assert isinstance(tok, TiktokenTokenizer) and tok.kind == "tiktoken"
    assert tok.vocab_size == n + 256
    specials = tok.special_ids()
    assert specials == {name: n + i for i, name in enumerate(META_SPECIALS)}
    assert tok.bos_id == n and tok.eos_id == n + 1 and tok.pad_id == specials["<|finetune_right_pad_id|>"]
    assert specials["<|start_header_id|>"] == n + 6 and specials["<|python_tag|>"] == n + 10
    assert tok.stop_ids == {specials[s] for s in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}
    assert (tok.add_bos, tok.add_eos) == (True, False)


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_tiktoken_matches_transformers_conversion(tiktoken_path, reference, i):
    tok = load_tokenizer(tiktoken_path)
    text = SAMPLES[i]
    reference.encode_special_tokens = True  # special strings in ordinary text are text
    want = reference.encode(text, add_special_tokens=False).ids
    assert tok.encode(text, bos=False) == want
    assert tok.encode(text) == [tok.bos_id] + want
    assert tok.decode(want) == text
    reference.encode_special_tokens = False  # special=True: parsed as the tokens
    assert tok.encode(text, bos=False, special=True) == reference.encode(text, add_special_tokens=False).ids


def test_tiktoken_batch_and_long_inputs(tiktoken_path, reference):
    tok = load_tokenizer(tiktoken_path)
    reference.encode_special_tokens = True
    assert tok.encode_batch(SAMPLES) == [e.ids for e in reference.encode_batch(SAMPLES, add_special_tokens=False)]
    long = "word " * 8000 + " " * 30_000 + "end"  # a whitespace run past Meta's 25k split point
    assert tok.decode(tok.encode(long, bos=False)) == long
    assert tok.encode_batch([long]) == [tok.encode(long, bos=False)]


# ------------------------------------------------------------------------------------ HF tokenizer.json

def test_hf_folder_matches_transformers(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_dir))
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf"
    assert tok.vocab_size == len(ref)
    assert tok.bos_id == ref.bos_token_id and tok.eos_id == ref.eos_token_id == ref.convert_tokens_to_ids("<|eot_id|>")
    assert tok.add_bos and not tok.add_eos  # read from the post-processor, as HF applies it
    for text in SAMPLES:
        assert tok.encode(text, special=True) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text, bos=False)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? <|eot_id|>"}]
    assert tok.chat_template == CHAT_TEMPLATE
    rendered = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = ref(rendered, add_special_tokens=False)["input_ids"]
    assert tok.encode(rendered, bos=False, special=True) == want
    assert tok.pad_id == tok.special_ids()["<|finetune_right_pad_id|>"]
    assert {tok.eos_id, tok.special_ids()["<|end_of_text|>"], tok.special_ids()["<|eom_id|>"]} <= tok.stop_ids


def test_hf_file_and_overrides(hf_dir, tmp_path):
    tok = load_tokenizer(str(hf_dir / "tokenizer.json"), add_bos=False, add_eos=True)  # config next to the file
    assert tok.kind == "hf" and tok.chat_template == CHAT_TEMPLATE
    assert tok.encode("hi") == tok.encode("hi", bos=False, eos=False) + [tok.eos_id]
    bare = tmp_path / "tokenizer.json"  # no tokenizer_config.json: Llama 3 names are recognised
    bare.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(str(bare))
    assert tok.bos_id == tok.special_ids()["<|begin_of_text|>"] and tok.chat_template is None and tok.add_bos


def test_folder_with_tiktoken_model_and_chat_template(tiktoken_path, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(Path(tiktoken_path).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": CHAT_TEMPLATE}]}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.kind == "tiktoken" and tok.chat_template == CHAT_TEMPLATE


# ----------------------------------------------------------------------------------------------- tf.data

@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "hf"])
def test_tf_tokenize_equals_encode_batch(kind, sp_path, tiktoken_path, hf_dir):
    import tensorflow as tf

    tok = load_tokenizer({"sentencepiece": sp_path, "tiktoken": tiktoken_path, "hf": str(hf_dir)}[kind])
    texts = SAMPLES * 3
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(4).map(tf_tokenize(tok))
    got = [row for batch in ds for row in batch.to_list()]
    assert got == tok.encode_batch(texts)
    scalar = tf_tokenize(tok, bos=True, eos=True)(tf.constant(SAMPLES[1]))
    assert scalar.dtype == tf.int32 and scalar.numpy().tolist() == tok.encode(SAMPLES[1], bos=True, eos=True)


def test_tf_tokenize_names_invalid_utf8(sp_path):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices([b"fine", b"bad \xff byte"]).batch(2)
    ds = ds.map(tf_tokenize(load_tokenizer(sp_path)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"document 1 of the batch is not valid UTF-8"):
        list(ds)


def test_encode_batch_equals_encode_without_bos_eos(sp_path, tiktoken_path, hf_dir):
    for path in (sp_path, tiktoken_path, str(hf_dir)):
        tok = load_tokenizer(path, add_eos=True)
        assert tok.encode_batch(SAMPLES) == [tok.encode(t, bos=False, eos=False) for t in SAMPLES], path


def test_using_tokenizers_does_not_import_tensorflow(sp_path, tiktoken_path, hf_dir):
    code = ("import sys\nfrom jaxllama.data.tokenizers import load_tokenizer\n"
            f"for p in {[sp_path, tiktoken_path, str(hf_dir)]!r}:\n"
            "    t = load_tokenizer(p); t.decode(t.encode('hi there')); t.encode_batch(['a', 'b'])\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------------------------------- bad input

def test_bad_tokenizer_files(tmp_path, tiktoken_path):
    cases = {
        "missing": (tmp_path / "nope.model", "no such file"),
        "empty": (tmp_path / "empty.model", "empty file"),
        "garbage_text": (tmp_path / "notes.model", "not a valid SentencePiece model"),
        "garbage_bytes": (tmp_path / "noise.model", "not a valid SentencePiece model"),
        "bad_json": (tmp_path / "tokenizer.json", "not a valid tokenizer.json"),
        "empty_dir": (tmp_path / "folder", "neither tokenizer.json nor tokenizer.model"),
    }
    cases["empty"][0].write_bytes(b"")
    cases["garbage_text"][0].write_text("just some notes\nnothing to see\n")
    cases["garbage_bytes"][0].write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    cases["bad_json"][0].write_text('{"version": "1.0", "model": ')
    cases["empty_dir"][0].mkdir()
    lines = Path(tiktoken_path).read_text().splitlines()
    bad_line = tmp_path / "bad_line.model"
    bad_line.write_text("\n".join(lines[:2] + ["!!notbase64 2"] + lines[3:]) + "\n")
    cases["bad_line"] = (bad_line, f"{bad_line}:3: not a tiktoken line")
    gap = tmp_path / "gap.model"
    gap.write_text("\n".join(lines[:5] + [lines[5].split()[0] + " 999999"] + lines[6:]) + "\n")
    cases["rank_gap"] = (gap, "ranks must be 0..")
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "tokenizer.model").write_text(Path(tiktoken_path).read_text())
    (cfg_dir / "tokenizer_config.json").write_text("{oops")
    cases["bad_config"] = (cfg_dir, "tokenizer_config.json: not valid JSON")
    for name, (path, words) in cases.items():
        with pytest.raises(ConfigError) as e:
            load_tokenizer(str(path))
        msg = str(e.value)
        assert words in msg and "\n" not in msg, (name, msg)
        assert str(path) in msg or name == "bad_config", (name, msg)


def test_config_naming_unknown_token(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|nope|>"}))
    with pytest.raises(ConfigError, match=r"names '<\|nope\|>', which is not in tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_bos_requested_but_absent(tiktoken_path, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.bos_id is None and not tok.add_bos and tok.encode("a b") == [0, 1]
    with pytest.raises(ConfigError, match="has no BOS token"):
        tok.encode("a", bos=True)


@pytest.mark.parametrize("vocab, docs, words", [
    (300, ["ab"] * 50 + ["".join(chr(0x4E00 + i) for i in range(200))] * 20, "too small for this corpus"),
    (5000, ["hello world, hello again"] * 100, "too large for this corpus: at most"),
    (100, ["hello"], "must be at least 261"),
    (1000, ["", "\n\n  \n"], "the input has no text"),
])
def test_training_errors(tmp_path, vocab, docs, words):
    out = tmp_path / "out.model"
    with pytest.raises(ConfigError, match=words) as e:
        train_sentencepiece(iter(docs), vocab, str(out))
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ----------------------------------------------------------------------------------------------- caching

def test_cached_stdlib_tokenizer_trains_once_across_processes(tmp_path, monkeypatch):
    counter = tmp_path / "trained.log"
    script = (
        "import sys\n"
        "from jaxllama.data import tokenizer_train as t\n"
        "real = t.train_sentencepiece\n"
        "def counted(*a, **k):\n"
        f"    open({str(counter)!r}, 'a').write('x')\n"
        "    return real(*a, **k)\n"
        "t.train_sentencepiece = counted\n"
        f"print(t.cached_stdlib_tokenizer(1000, {str(tmp_path / 'cache')!r}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV) for _ in range(2)]
    outs = [p.communicate(timeout=280) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    path = str(tmp_path / "cache" / "stdlib-sp-1000.model")
    assert [o[0].strip() for o in outs] == [path, path]
    assert counter.read_text() == "x"  # the second process waited for the first and reused its model
    assert not list((tmp_path / "cache").glob("*.tmp"))
    tok = load_tokenizer(path)
    assert tok.vocab_size == 1000 and tok.decode(tok.encode(CODE)) == CODE
    # Same process, third call: cached, no training.
    monkeypatch.setattr(tokenizer_train, "train_sentencepiece", lambda *a, **k: pytest.fail("retrained"))
    mtime = os.stat(path).st_mtime_ns
    assert cached_stdlib_tokenizer(1000, str(tmp_path / "cache")) == path and os.stat(path).st_mtime_ns == mtime
    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path / "cache"))
    assert cached_stdlib_tokenizer(1000) == path


def test_damaged_cache_is_retrained(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "stdlib-sp-600.model").write_bytes(b"truncated")
    calls = []

    def fake_train(docs, vocab, output, **kw):
        calls.append(vocab)
        return train_sentencepiece(corpus_texts(5), vocab, output)

    monkeypatch.setattr(tokenizer_train, "train_sentencepiece", fake_train)
    path = cached_stdlib_tokenizer(600, str(cache))
    assert calls == [600] and load_tokenizer(path).vocab_size == 600


# ------------------------------------------------------------------------------------------------- CLI

def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "jaxllama.cli", "tokenizer", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def test_cli_train_on_stdlib_end_to_end(tmp_path):
    out = tmp_path / "sub" / "tokenizer.model"
    p = cli("train", "--input", "stdlib", "--vocab-size", "1000", "--output", str(out), "--max-sentences", "100000")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {out}: SentencePiece BPE, 1000 pieces") and p.stderr == ""
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert sp.get_piece_size() == 1000 and sp.decode(sp.encode(CODE)) == CODE
    assert cli("train", "--help").returncode == 0
    p = cli("info", str(out), "--text", CODE)
    assert p.returncode == 0 and "sentencepiece, vocab_size 1000" in p.stdout and "bos_id 1" in p.stdout


def test_cli_train_jsonl(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in corpus_texts(10)) + "\n")
    out = tmp_path / "j.model"
    p = cli("train", "--input", str(data), "--vocab-size", "400", "--output", str(out), "--text-key", "body")
    assert p.returncode == 0, p.stderr
    assert load_tokenizer(str(out)).vocab_size == 400


@pytest.mark.parametrize("args, words", [
    (["train", "--input", "/nonexistent/*.txt", "--vocab-size", "500", "--output", "X"], "no files match"),
    (["train", "--input", "EMPTY", "--vocab-size", "500", "--output", "X"], "empty.txt: empty file"),
    (["train", "--input", "SMALL", "--vocab-size", "50000", "--output", "X"], "--vocab-size 50000 is too large"),
    (["train", "--input", "JSONL", "--vocab-size", "500", "--output", "X"], ":1: no key 'text'"),
    (["train", "--input", "SMALL", "--vocab-size", "lots", "--output", "X"], "--vocab-size"),
    (["train", "--input", "SMALL", "--output", "X"], "--vocab-size"),
    (["info", "/nonexistent/tokenizer.model"], "no such file or directory"),
    (["train", "--input", "SMALL", "--vocab-size", "500", "--output", "X", "--format", "xml"], "--format"),
    ([], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, words):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "small.txt").write_text("hello world\n" * 20)
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    subst = {"EMPTY": str(tmp_path / "empty.txt"), "SMALL": str(tmp_path / "small.txt"),
             "JSONL": str(tmp_path / "d.jsonl"), "X": str(tmp_path / "out.model")}
    p = cli(*[subst.get(a, a) for a in args])
    out = (p.stdout + p.stderr).strip()
    assert p.returncode == 2, out
    assert len(out.splitlines()) == 1 and "Traceback" not in out and words in out, out
    assert not (tmp_path / "out.model").exists()


def test_tiktoken_long_run_splitting_follows_meta(monkeypatch):
    """Meta's encoder cuts a run of (non-)whitespace every N chars; ours must cut at the same places."""
    import random
    import re

    from jaxllama.data import tokenizers as T

    def meta_split(s, limit):  # Meta's llama3 _split_whitespaces_or_nonwhitespaces, restated
        run, is_space, start = 0, s[0].isspace() if s else False, 0
        for i, ch in enumerate(s):
            if ch.isspace() != is_space:
                run, is_space = 1, ch.isspace()
            else:
                run += 1
                if run > limit:
                    yield s[start:i]
                    start, run = i, 1
        yield s[start:]

    monkeypatch.setattr(T, "_TIKTOKEN_MAX_RUN", 5)
    monkeypatch.setattr(T, "_LONG_RUN", re.compile(r"\s{6,}|\S{6,}"))
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice(" a\u00a0\nb\t") * rng.randint(1, 13) for _ in range(rng.randint(0, 8)))
        assert T._tiktoken_chunks(s) == list(meta_split(s, 5)), repr(s)


def test_demo_tokenizer_too_small_for_the_model_vocab_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"stdlib demo tokenizer: model.vocab_size 128: must be at least 261"):
        cached_stdlib_tokenizer(128, str(tmp_path))
    assert not list(tmp_path.glob("*.model"))


def test_llama2_style_hf_folder_agrees_with_sentencepiece(sp_path, tmp_path):
    """transformers converts our SentencePiece model to a tokenizer.json; both routes give the same ids."""
    from transformers import AutoTokenizer, LlamaTokenizer

    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(Path(sp_path).read_bytes())
    LlamaTokenizer.from_pretrained(str(tmp_path / "sp")).save_pretrained(str(tmp_path / "hf"))
    hf, sp = load_tokenizer(str(tmp_path / "hf")), load_tokenizer(sp_path)
    assert hf.kind == "hf" and (hf.bos_id, hf.eos_id, hf.vocab_size) == (1, 2, 600)
    ref = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in SAMPLES:
        assert hf.encode(text, special=True) == ref(text)["input_ids"], text  # BOS as HF's config says
        if text.startswith(" "):  # transformers' Metaspace conversion differs from SentencePiece here (and
            continue              # does not round-trip such text itself); ours follows transformers
        assert hf.encode(text, bos=False) == sp.encode(text, bos=False), text  # "<s>" typed in text stays text
        assert hf.decode(hf.encode(text, bos=False)) == text


def test_pieces_are_the_vocabulary_entries(sp_path, tiktoken_path, hf_dir):
    """tokenizer info shows each id's own entry (BOS as <s>, byte pieces as <0x..>), checked against the
    libraries' own id -> piece maps; decoding one id alone gives '' or a replacement character."""
    from tokenizers import Tokenizer as HFTok

    from jaxllama.data.tokenizers import describe_tokenizer, load_tokenizer

    sp = load_tokenizer(sp_path)
    ref = spm.SentencePieceProcessor(model_file=sp_path)
    ids = sp.encode("héllo wörld")
    assert [sp.piece(i) for i in ids] == [ref.id_to_piece(i) for i in ids]
    assert sp.piece(sp.bos_id) == "<s>" and "<s>" in describe_tokenizer(sp_path, "hi").splitlines()[-1]
    hf = load_tokenizer(str(hf_dir))
    want = HFTok.from_file(str(hf_dir / "tokenizer.json"))
    ids = hf.encode("héllo wörld", bos=True)
    assert [hf.piece(i) for i in ids] == [want.id_to_token(i) for i in ids] and hf.piece(ids[0]) == "<|begin_of_text|>"
    tk = load_tokenizer(tiktoken_path)
    ids = tk.encode("héllo wörld", bos=True)
    assert tk.piece(ids[0]) == "<|begin_of_text|>"
    import re

    def as_bytes(piece):  # a byte piece is spelled <0xNN>; anything else is its UTF-8 text
        return b"".join(bytes([int(h, 16)]) if h else t.encode() for h, t in re.findall(r"<0x([0-9A-F]{2})>|(.)", piece))
    assert b"".join(as_bytes(tk.piece(i)) for i in ids[1:]) == "héllo wörld".encode()
    assert any(tk.piece(i).startswith("<0x") for i in ids)  # this small vocabulary splits é into its bytes
