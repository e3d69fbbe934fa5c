"""GGUF export/import with the gguf package: exact f32 round trips, bf16/q8_0 error bounds, tokenizers, errors.

(llama.cpp itself loading our files is tests/test_convert_llamacpp.py.)
"""

import io
import json
import random

import gguf
import numpy as np
import pytest
import sentencepiece as spm

from helpers import random_params
from jaxllama.cli import main
from jaxllama.config import load_config
from jaxllama.convert import convert, load_model
from jaxllama.convert.common import Extras, ParamsSource
from jaxllama.convert.hf import write_hf
from jaxllama.model.llama import Arch

LLAMA3 = ["model.rope_type=llama3", "model.rope_factor=8", "model.rope_original_max_position=64",
          "model.rope_theta=500000"]
TEXTS = ["hello world, this is a test", "the quick brown fox jumps over the lazy dog 12345",
         "  spaces   and\nnewlines\t tabs"]


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "test", "this",
             "is", "a", "spaces", "and", "newlines", "tabs", "0", "1", "2", "3", "4", "5"]
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n)]


def spm_tokenizer(folder, vocab_size=320):
    """A real SentencePiece BPE model with Llama 1/2's options (byte fallback, no normalization), trained here."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return 1, 2  # bos, eos


def bpe_tokenizer(folder, vocab_size=300):
    """A byte-level BPE tokenizer.json with Llama 3's pre-tokenizer and special tokens, trained here."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    from jaxllama.convert.gguf_vocab import LLAMA3_SPLIT

    tok = Tokenizer(BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|>:0 $A:0",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return bos, tok.token_to_id("<|end_of_text|>")


def hf_with_tokenizer(folder, kind, overrides=(), seed=0):
    """A Hugging Face folder: random tiny model + a real tokenizer (``spm`` or ``bpe``)."""
    vocab = 320
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", f"model.vocab_size={vocab}", *overrides]).model
    params = random_params(Arch.from_config(m), seed=seed)
    tok_dir = folder.parent / f"{folder.name}-tok"
    tok_dir.mkdir()
    bos, eos = (spm_tokenizer if kind == "spm" else bpe_tokenizer)(tok_dir)
    write_hf(ParamsSource(params, m, Extras(tokenizer_dir=tok_dir, bos_token_id=bos, eos_token_id=eos)), folder)
    return params, m


def flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}/")
        else:
            yield prefix + k, np.asarray(v, np.float32)


@pytest.mark.parametrize("overrides", [[], LLAMA3, ["model.tie_embeddings=true"], ["model.head_dim=32"]],
                         ids=["gqa", "llama3_rope", "tied", "head_dim"])
def test_f32_round_trip_is_exact(tmp_path, overrides):
    params, m = hf_with_tokenizer(tmp_path / "hf", "spm", overrides)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 0
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight", "output_norm.weight"} <= names
    assert ("output.weight" in names) != m.tie_embeddings
    assert ("rope_freqs.weight" in names) == (m.rope_type == "llama3")
    loaded = load_model(str(tmp_path / "m.gguf"))
    assert loaded.model_cfg == m
    a, b = dict(flat(params)), dict(flat(loaded.params))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # GGUF -> HF: tensors and config.json identical to the source folder's
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf2" / "config.json").read_text())
    c = dict(flat(load_model(str(tmp_path / "hf2")).params))
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)


def test_q_and_k_are_stored_in_llama_cpp_interleaved_layout(tmp_path):
    """Pin the layout independently: llama.cpp's converter permutes HF q as reshape(h, 2, hd/2, in).swapaxes(1, 2)."""
    params, m = hf_with_tokenizer(tmp_path / "hf", "spm")
    convert(str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "gguf")
    t = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    hf_q = params["layers"]["self_attn"]["q_proj"]["kernel"][1].T  # [out, in] as Hugging Face stores it
    expected = hf_q.reshape(m.n_heads, 2, m.head_dim // 2, m.dim).swapaxes(1, 2).reshape(hf_q.shape)
    np.testing.assert_array_equal(np.asarray(t["blk.1.attn_q.weight"].data), expected)
    hf_k = params["layers"]["self_attn"]["k_proj"]["kernel"][0].T
    expected = hf_k.reshape(m.n_kv_heads, 2, m.head_dim // 2, m.dim).swapaxes(1, 2).reshape(hf_k.shape)
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_k.weight"].data), expected)


@pytest.mark.parametrize("kind,tol", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 1.5e-2)])
def test_reduced_precision_types(tmp_path, kind, tol):
    params, m = hf_with_tokenizer(tmp_path / "hf", "spm", ["model.dim=64", "model.ffn_dim=96"])
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf",
                 "--gguf-type", kind]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
    a, b = dict(flat(params)), dict(flat(load_model(str(tmp_path / "m.gguf")).params))
    for k in a:  # relative to each tensor's scale; a wrong layout would be off by O(1)
        err = np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()
        assert err < tol, (k, err)


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_tokenizer_travels_through_gguf(tmp_path, kind):
    hf_with_tokenizer(tmp_path / "hf", kind)
    convert(str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["tokenizer.ggml.model"] == ("llama" if kind == "spm" else "gpt2")
    loaded = load_model(str(tmp_path / "m.gguf"))
    tok_dir = tmp_path / "hf-tok"
    if kind == "spm":
        a = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        b = spm.SentencePieceProcessor(model_file=loaded.tokenizer_path + "/tokenizer.model")
        for text in TEXTS:
            assert a.encode(text) == b.encode(text), text
        assert (loaded.bos_token_id, loaded.eos_token_id) == (a.bos_id(), a.eos_id())
    else:
        from transformers import AutoTokenizer

        assert fields["tokenizer.ggml.pre"] == "llama-bpe" and len(fields["tokenizer.ggml.merges"]) > 10
        assert fields["tokenizer.ggml.token_type"][fields["tokenizer.ggml.bos_token_id"]] == 3  # CONTROL
        a = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
        b = AutoTokenizer.from_pretrained(loaded.tokenizer_path)
        for text in TEXTS:
            assert a(text)["input_ids"] == b(text)["input_ids"], text
            assert b.decode(b(text)["input_ids"], skip_special_tokens=True) == text
        assert loaded.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        assert len(fields["tokenizer.ggml.tokens"]) == 320  # padded to the embedding rows


def _edit_gguf(src, dst, drop_tensor=None, arch=None, drop_key=None):
    """Rewrite a GGUF with the gguf package, changing one thing."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or "llama")
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name == drop_key:
            continue
        if arch and name.startswith("llama."):
            name = arch + name[5:]
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vtype)
    for t in r.tensors:
        if t.name != drop_tensor:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


BAD = {
    "truncated": ("truncated or corrupt GGUF", None),
    "not_llama": ("general.architecture 'mistral'", dict(arch="mistral")),
    "missing_key": ("llama.feed_forward_length", dict(drop_key="llama.feed_forward_length")),
    "missing_tensor": ("blk.1.ffn_up.weight not found", dict(drop_tensor="blk.1.ffn_up.weight")),
}


@pytest.mark.parametrize("how", BAD)
def test_bad_gguf_is_one_line_naming_file_and_key(tmp_path, capsys, how):
    hf_with_tokenizer(tmp_path / "hf", "spm")
    convert(str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "gguf")
    bad = tmp_path / "bad.gguf"
    message, edit = BAD[how]
    if edit is None:
        bad.write_bytes((tmp_path / "m.gguf").read_bytes()[:-5000])
    else:
        _edit_gguf(tmp_path / "m.gguf", bad, **edit)
    before = set(tmp_path.iterdir())
    assert main(["convert", str(bad), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.gguf" in err and message in err, err
    assert set(tmp_path.iterdir()) == before


def test_gguf_type_needs_gguf_target(tmp_path, capsys):
    hf_with_tokenizer(tmp_path / "hf", "spm")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "o"), "--to", "hf", "--gguf-type", "q8_0"]) == 2
    assert "--gguf-type applies only to --to gguf" in capsys.readouterr().err


def test_tokenizer_info_reads_a_gguf_and_training_says_how_to_use_one(tmp_path, capsys):
    from jaxllama.data.tokenizers import load_tokenizer
    from jaxllama.errors import ConfigError

    hf_with_tokenizer(tmp_path / "hf", "spm")
    convert(str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "gguf")
    capsys.readouterr()
    assert main(["tokenizer", "info", str(tmp_path / "m.gguf"), "--text", "hello"]) == 0
    out = capsys.readouterr().out
    assert "the tokenizer inside the GGUF file" in out and "sentencepiece, vocab_size" in out and "pieces:" in out
    with pytest.raises(ConfigError, match=r"a GGUF model file.*jaxllama convert .*m.gguf DIR --to hf"):
        load_tokenizer(str(tmp_path / "m.gguf"))  # what data.tokenizer=m.gguf reports
