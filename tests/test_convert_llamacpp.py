"""llama.cpp (llama-cpp-python, built from source) runs the GGUF files we export, and we read its quantizations.

The reference here is llama.cpp itself: its tokenizer on our exported vocab, its logits and its
greedy continuation against jaxllama's forward on the same weights, and its own quantizer
(``llama_model_quantize``) for the K-quant files we import.
"""

import ctypes
import dataclasses

import jax
import llama_cpp
import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from helpers import random_params
from jaxllama.cli import main
from jaxllama.config import load_config
from jaxllama.convert import convert, load_model
from jaxllama.convert.common import ParamsSource
from jaxllama.convert.gguf_format import write_gguf
from jaxllama.model.llama import Arch, Llama
from test_convert_gguf import LLAMA3, hf_with_tokenizer, flat
from test_tokenizers import tiktoken_path  # noqa: F401 (fixture)

PROMPT = "hello world the quick brown fox"
F32 = 0  # GGML_TYPE_F32, for llama.cpp's KV cache (its default f16 cache would blur the comparison)


def llama_cpp_model(path):
    """llama.cpp on plain CPU weights: on CPUs with AMX (this machine's and CI's Xeons) llama.cpp repacks
    bf16/q8_0 weights into AMX buffers by default, and that path segfaults on this tiny model's shapes
    (llama-cpp-python 0.3.34 and 0.3.36 alike). ``use_extra_bufts`` off is llama.cpp's own switch for
    it; llama-cpp-python does not expose it, so it is set on the default parameters for this load."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                               n_threads=2, type_k=F32, type_v=F32)
    finally:
        low.llama_model_default_params = default


def our_greedy(m, params, prompt, n):
    """Greedy decoding with the full forward (no cache): one fixed-length buffer, so one compile."""
    a = Arch.from_config(m)
    fwd = jax.jit(lambda p, t: Llama(a).apply({"params": p}, t))
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        logits = np.asarray(fwd(params, buf))[0, i - 1]  # causal: the zeros after i do not matter
        buf[0, i] = int(np.argmax(logits))
    return buf[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind,overrides", [("spm", LLAMA3), ("bpe", ["model.tie_embeddings=true"])],
                         ids=["spm-llama3rope", "bpe-tied"])
def test_llama_cpp_greedy_continuation_equals_ours(tmp_path, kind, overrides):
    params, m = hf_with_tokenizer(tmp_path / "hf", kind, overrides, seed=3)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 0
    llm = llama_cpp_model(tmp_path / "m.gguf")
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    if kind == "spm":  # llama.cpp tokenizes with our exported vocab exactly as SentencePiece does
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "hf-tok" / "tokenizer.model"))
        assert prompt == [sp.bos_id()] + sp.encode(PROMPT)
    else:
        assert prompt == AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(PROMPT)["input_ids"]
    llm.reset()
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)])
    ours = np.asarray(Llama(Arch.from_config(m)).apply({"params": params}, np.array([prompt])))[0]
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    n = 16
    theirs_gen = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs_gen.append(tok)
        if len(theirs_gen) == n:
            break
    assert theirs_gen == our_greedy(m, params, prompt, n)


@pytest.mark.parametrize("kind", ["bf16", "q8_0"])
def test_llama_cpp_runs_reduced_precision_exports(tmp_path, kind):
    params, m = hf_with_tokenizer(tmp_path / "hf", "spm", seed=4)
    convert(str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "gguf", gguf_type=kind)
    llm = llama_cpp_model(tmp_path / "m.gguf")
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)])
    ours = np.asarray(Llama(Arch.from_config(m)).apply({"params": params}, np.array([prompt])))[0]
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()


QUANTS = {"Q4_0": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, 0.15), "Q4_1": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, 0.15),
          "Q4_K": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 0.15), "Q5_K": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, 0.08),
          "Q6_K": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K, 0.04), "Q8_0": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 0.01)}


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """A model with 256-wide rows (K-quants work on 256-blocks), exported in f32."""
    d = tmp_path_factory.mktemp("quant")
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", "model.dim=256", "model.ffn_dim=512",
                           "model.vocab_size=256", "model.n_heads=4", "model.n_kv_heads=2"]).model
    params = random_params(Arch.from_config(m), seed=5)
    write_gguf(ParamsSource(params, m), d / "f32.gguf", "f32")
    return d, params, m


@pytest.mark.parametrize("qtype", QUANTS)
def test_import_of_llama_cpp_quantized_files(f32_gguf, qtype):
    d, params, m = f32_gguf
    ftype, tol = QUANTS[qtype]
    qparams = llama_cpp.llama_model_quantize_default_params()
    qparams.ftype = ftype
    qparams.nthread = 2
    out = d / f"{qtype}.gguf"
    assert llama_cpp.llama_model_quantize(str(d / "f32.gguf").encode(), str(out).encode(),
                                          ctypes.byref(qparams)) == 0
    import gguf

    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert qtype in types, types
    loaded = load_model(str(out))
    assert loaded.model_cfg == m
    a, b = dict(flat(params)), dict(flat(loaded.params))
    for k in a:  # relative RMS error per tensor; a wrong layout or transposition would be ~1.4
        err = np.sqrt(np.mean((a[k] - b[k]) ** 2)) / np.sqrt(np.mean(a[k] ** 2))
        assert err < tol, (qtype, k, err)


# llama.cpp type -> how it loads for inference: (our dtype, inputs per scale); None: re-quantized int8/32
AS_QUANTIZED = {"Q8_0": (np.int8, 32), "Q4_0": (np.uint8, 32), "Q6_K": (np.int8, 16), "Q4_1": None, "Q4_K": None,
                "Q5_K": None}


@pytest.mark.parametrize("qtype", QUANTS)
def test_quantized_gguf_loads_as_quantized(f32_gguf, qtype):
    """A llama.cpp-quantized file loads for inference as our quantized tree, not f32: Q8_0, Q4_0 and
    Q6_K block for block (dequantized, exactly the ``gguf`` package's dequantization of the file), the
    rest re-quantized to int8; the quantized model's logits equal those of the dequantized weights."""
    import gguf

    from jaxllama.model import quant
    from jaxllama.model.llama import model_params

    d, params, m = f32_gguf
    path = d / f"{qtype}.gguf"
    if not path.exists():
        qparams = llama_cpp.llama_model_quantize_default_params()
        qparams.ftype, qparams.nthread = QUANTS[qtype][0], 2
        assert llama_cpp.llama_model_quantize(str(d / "f32.gguf").encode(), str(path).encode(),
                                              ctypes.byref(qparams)) == 0
    dense = load_model(str(path)).params  # the gguf package's dequantization, as before
    tree = load_model(str(path), keep_quantized=True).params
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    node = tree["layers"]["mlp"]["gate_proj"]
    assert "kernel" not in node and quant.detect(tree) is not None
    want = AS_QUANTIZED[types["blk.0.ffn_gate.weight"]]
    if want is not None:
        assert node["kernel_q"].dtype == want[0] and node["kernel_scale"].shape[-1] == 256 // want[1]
    for layer_name in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "mlp/down_proj"):
        *parents, leaf = layer_name.split("/")
        n = tree["layers"][parents[0]][leaf]
        got = np.asarray(quant.dequantize(n["kernel_q"], n["kernel_scale"], quant.mode_of(n["kernel_q"])))
        ref = dense["layers"][parents[0]][leaf]["kernel"]
        exact = AS_QUANTIZED[types[f"blk.0.{_GGUF_NAMES[layer_name]}.weight"]] is not None
        if exact:
            np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=1e-7, err_msg=layer_name)
        else:  # int8 over the file's values: within half an int8 step of them
            assert np.abs(got - ref).max() <= np.abs(ref).max() / 127, layer_name
    a = Arch.from_config(m)
    qa = dataclasses.replace(a, quantize=quant.detect(tree)[0], quant_group=32, quant_embed=True)
    tokens = np.array([[1, 5, 9, 33, 2, 7, 100, 3]])
    ours = np.asarray(Llama(qa).apply({"params": tree}, tokens))
    ref = np.asarray(Llama(a).apply({"params": dense}, tokens))
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < (2e-2 if want is None else 1e-5), rel  # re-quantized: int8's error on top of the file's


_GGUF_NAMES = {"self_attn/q_proj": "attn_q", "self_attn/k_proj": "attn_k", "self_attn/v_proj": "attn_v",
               "mlp/down_proj": "ffn_down"}


def test_meta_llama3_tiktoken_tokenizer_goes_into_gguf_and_hf(tmp_path, tiktoken_path):
    """Meta's Llama 3 folder (tiktoken tokenizer.model) -> GGUF: llama.cpp tokenizes like our tiktoken
    tokenizer, special tokens included, and the GGUF's tokenizer read back by us does too."""
    import shutil

    from jaxllama.convert.common import Extras
    from jaxllama.convert.meta import write_meta
    from jaxllama.data.tokenizers import load_tokenizer

    ours = load_tokenizer(tiktoken_path)
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", f"model.vocab_size={ours.vocab_size + 4}"]).model
    (tmp_path / "tok").mkdir()
    shutil.copy(tiktoken_path, tmp_path / "tok" / "tokenizer.model")
    write_meta(ParamsSource(random_params(Arch.from_config(m), seed=2), m, Extras(tokenizer_dir=tmp_path / "tok")),
               tmp_path / "meta")
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    texts = [PROMPT, "def main():\n    return 12345  # x", "  spaced   out\n\nlines", "naïve café ünïcödé"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True) == ours.encode(text, bos=True), text
    chat = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == ours.encode(chat, bos=False, special=True)
    back = load_tokenizer(load_model(str(tmp_path / "m.gguf")).tokenizer_path)
    assert all(back.encode(t) == ours.encode(t) for t in texts)
    assert back.bos_id == ours.bos_id and back.eos_id == ours.eos_id
    # Meta -> Hugging Face: transformers gets a tokenizer.json that encodes the same
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in texts:
        assert hf(text)["input_ids"] == ours.encode(text, bos=True), text
    assert hf(chat, add_special_tokens=False)["input_ids"] == ours.encode(chat, bos=False, special=True)
