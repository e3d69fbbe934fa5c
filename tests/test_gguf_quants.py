"""Quantized GGUF export (``--gguf-type q8_0 q6_k q5_1 q5_0 q4_k_m q4_k q4_1 q4_0``) against llama.cpp.

The reference is llama.cpp's own quantizer (llama-cpp-python's ``llama_model_quantize``) run on our
f32 export of the same model: our Q4_K/Q6_K blocks against its blocks (bit-identical, all of them
here), our per-tensor type choice against its choice, and llama.cpp's logits on our files
against its logits on its own files. The model is the trained fixture (``trained_model.py``): a
random model's logits barely depend on which weights are slightly off.

Quality is measured with llama.cpp's logits on a fixed text from the stdlib corpus the model was
trained on (textwrap.py: the run saw under 1% of the corpus): perplexity, and the mean KL divergence
of each file's next-token distributions from the f32 file's (positive, and far less noisy than a
perplexity difference on a model this small, where quantization moves perplexity by under 1%, either way).
"""

import ctypes
import pathlib
import sysconfig

import gguf
import llama_cpp
import numpy as np
import pytest

from helpers import random_params
from jaxllama.cli import main
from jaxllama.config import load_config
from jaxllama.convert.api import GGUF_TYPES
from jaxllama.convert.common import ParamsSource
from jaxllama.convert.gguf_format import write_gguf
from jaxllama.convert.gguf_quants import quantize_q4_k, quantize_q6_k
from jaxllama.model.llama import Arch
from test_convert_llamacpp import llama_cpp_model

Q = gguf.GGMLQuantizationType
QUANTIZED = [k for k in GGUF_TYPES if k not in ("f32", "f16", "bf16")]
# llama.cpp's file type for each kind; q4_k is every matrix Q4_K: llama-quantize --pure Q4_K_S
LLAMA_FTYPE = {"q8_0": ("Q8_0", False), "q6_k": ("Q6_K", False), "q5_1": ("Q5_1", False),
               "q5_0": ("Q5_0", False), "q4_k_m": ("Q4_K_M", False), "q4_k": ("Q4_K_S", True),
               "q4_1": ("Q4_1", False), "q4_0": ("Q4_0", False)}
# How much each kind may raise perplexity over f32 (relative; measured: at most +0.06%, q4_k lowers it 0.6%)
PPL_RISE = {"q8_0": 0.005, "q6_k": 0.01, "q5_1": 0.02, "q5_0": 0.02, "q4_k_m": 0.03, "q4_k": 0.03,
            "q4_1": 0.03, "q4_0": 0.03}
CHUNKS, CTX = 8, 128  # llama_cpp_model's context: 8 windows of BOS + 127 tokens
PROMPT = b"def main(argv):\n    "


def llama_quantize(src, dst, kind: str) -> None:
    name, pure = LLAMA_FTYPE[kind]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    p.nthread = 2
    p.pure = pure
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


def tensor_types(path) -> dict:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def run_llama_cpp(path, text: str):
    """llama.cpp on ``path``: log-probabilities [n, vocab] of each next token of ``text``, the targets, and
    the greedy continuation of PROMPT (16 tokens)."""
    llm = llama_cpp_model(path)
    toks = llm.tokenize(text.encode(), add_bos=False)
    bos = llm.token_bos()
    logp, targets = [], []
    for c in range(CHUNKS):
        window = [bos] + toks[c * (CTX - 1):(c + 1) * (CTX - 1)]
        llm.reset()
        llm.eval(window)
        s = np.array(llm.scores[:len(window)], np.float64)
        s -= s.max(1, keepdims=True)
        logp.append((s - np.log(np.exp(s).sum(1, keepdims=True)))[:-1])
        targets += window[1:]
    greedy = []
    for tok in llm.generate(llm.tokenize(PROMPT, add_bos=True), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                            repeat_penalty=1.0, reset=True):
        greedy.append(tok)
        if len(greedy) == 16:
            break
    return np.concatenate(logp), np.array(targets), greedy


@pytest.fixture(scope="module")
def exports(trained_tiny, tmp_path_factory):
    """The trained model through ``jaxllama convert --to gguf`` as f32 and every quantized kind, llama.cpp's
    quantization of our f32 file to each kind, and llama.cpp's results on all of them."""
    d = tmp_path_factory.mktemp("gguf_quants")
    text = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    files = {}
    for kind in ["f32", *QUANTIZED]:
        files[kind] = d / f"{kind}.gguf"
        assert main(["convert", str(trained_tiny), str(files[kind]), "--to", "gguf", "--gguf-type", kind]) == 0
    for kind in QUANTIZED:
        files["llama.cpp " + kind] = d / f"llama-cpp-{kind}.gguf"
        llama_quantize(files["f32"], files["llama.cpp " + kind], kind)
    results = {k: run_llama_cpp(p, text) for k, p in files.items()}
    ref, targets, _ = results["f32"]
    assert len(targets) == CHUNKS * (CTX - 1)

    def quality(key):
        logp = results[key][0]
        ppl = float(np.exp(-logp[np.arange(len(targets)), targets].mean()))
        kl = float((np.exp(ref) * (ref - logp)).sum(1).mean())
        return ppl, kl

    return files, {k: quality(k) for k in results}, {k: r[2] for k, r in results.items()}


def test_trained_fixture_has_learned_something(exports):
    _, quality, _ = exports
    assert quality["f32"][0] < 1000  # ln-perplexity ~6.5 on unseen text; an untrained model's is ~ln 2048 plus


@pytest.mark.parametrize("kind", QUANTIZED)
def test_each_quantized_type_runs_in_llama_cpp_like_llama_cpps_own(exports, kind):
    files, quality, greedy = exports
    ppl32 = quality["f32"][0]
    ppl, kl = quality[kind]
    ppl_lc, kl_lc = quality["llama.cpp " + kind]
    assert ppl <= ppl32 * (1 + PPL_RISE[kind]), (kind, ppl, ppl32)
    assert abs(ppl / ppl_lc - 1) < 0.002, (kind, ppl, ppl_lc)  # as good as llama.cpp's quantization
    assert 0 < kl <= 1.1 * kl_lc, (kind, kl, kl_lc)
    # Greedy text: our file generates what llama.cpp's own quantization of the model generates (16 tokens);
    # q8_0 also f32's. At 6 bits and below a near-tie of this 4M-parameter model can flip (the fixture is
    # trained on the machine running the tests: on one Intel Xeon, Q6_K, ours and llama.cpp's alike, put
    # token 290 before f32's second token), so f32 equality is asked of q8_0 only.
    assert greedy[kind] == greedy["llama.cpp " + kind]
    if kind == "q8_0":
        assert greedy[kind][:8] == greedy["f32"][:8]
    # the same type for every tensor as llama.cpp's quantizer chooses, the file type and version it writes
    assert tensor_types(files[kind]) == tensor_types(files["llama.cpp " + kind])
    ours, theirs = gguf.GGUFReader(files[kind]).fields, gguf.GGUFReader(files["llama.cpp " + kind]).fields
    for key in ("general.file_type", "general.quantization_version"):
        assert ours[key].contents() == theirs[key].contents(), key


def test_q4_k_m_perplexity_delta_matches_llama_cpps_q4_k_m(exports):
    """|Δ_ours − Δ_llama.cpp| <= max(0.1·|Δ_llama.cpp|, 0.001), Δ the relative perplexity change from f32.
    On this model Δ is a few hundredths of a percent (llama.cpp's and ours), below the 0.1% floor; the KL divergence,
    which does resolve them, is held to 10% in the test above."""
    _, quality, _ = exports
    ppl32 = quality["f32"][0]
    ours, theirs = quality["q4_k_m"][0] / ppl32 - 1, quality["llama.cpp q4_k_m"][0] / ppl32 - 1
    assert abs(ours - theirs) <= max(0.1 * abs(theirs), 0.001), (ours, theirs)
    types = tensor_types(exports[0]["q4_k_m"])
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    # use_more_bits(i, 4): i < 4//8 (none), i >= 7*4//8 (3), (i - 4//8) % 3 == 2 (2)
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]


def _edge_params(m):
    """Random weights, and in one matrix rows llama.cpp treats specially: zero, constant, one sign, an
    outlier, values under its 1e-15 threshold, half zeros."""
    params = random_params(Arch.from_config(m), seed=7)
    up = np.array(params["layers"]["mlp"]["up_proj"]["kernel"])  # [layers, in, out]: GGUF rows are columns
    rng = np.random.default_rng(0)
    n = up.shape[1]
    up[0, :, 0] = 0
    up[0, :, 1] = 0.5
    up[0, :, 2] = -np.abs(rng.normal(size=n))
    up[0, :, 3] = rng.normal(size=n)
    up[0, 5, 3] = 100
    up[0, :, 4] = 1e-20 * rng.normal(size=n)
    up[0, :, 5] = rng.normal(size=n) * (np.arange(n) % 2)
    up[0, :128, 6] = 0
    params["layers"]["mlp"]["up_proj"]["kernel"] = up
    return params


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quant_blocks_match_llama_cpps_quantizer(exports, tmp_path, qtype):
    """Our numpy Q4_K/Q6_K against llama.cpp's quantize_row_q4_K_ref/q6_K_ref on the same f32 tensors: the
    trained model's, and a random model's with the awkward rows of _edge_params."""
    ours_fn = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}[qtype]
    kind = {"Q4_K": "q4_k", "Q6_K": "q6_k"}[qtype]
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", "model.dim=256", "model.ffn_dim=512",
                           "model.vocab_size=256", "model.n_heads=4", "model.n_kv_heads=2"]).model
    write_gguf(ParamsSource(_edge_params(m), m), tmp_path / "edge.gguf", "f32")
    llama_quantize(tmp_path / "edge.gguf", tmp_path / "edge-q.gguf", kind)
    pairs = [(exports[0]["f32"], exports[0]["llama.cpp " + kind]), (tmp_path / "edge.gguf", tmp_path / "edge-q.gguf")]
    block = gguf.GGML_QUANT_SIZES[Q[qtype]][1]
    for src, theirs_path in pairs:
        edge = src.name == "edge.gguf"
        f32 = {t.name: np.array(t.data) for t in gguf.GGUFReader(src).tensors}
        same = total = 0
        err_ours = err_theirs = 0.0
        for t in gguf.GGUFReader(theirs_path).tensors:
            if t.tensor_type != Q[qtype]:
                continue
            x = f32[t.name]
            ours = ours_fn(x)
            theirs = np.array(t.data).reshape(ours.shape)
            same += int((ours.reshape(-1, block) == theirs.reshape(-1, block)).all(1).sum())
            total += ours.size // block
            back = gguf.quants.dequantize(ours, Q[qtype]).reshape(x.shape)
            assert np.isfinite(back).all()
            err_ours += float(((back - x) ** 2).sum())
            err_theirs += float(((gguf.quants.dequantize(theirs, Q[qtype]).reshape(x.shape) - x) ** 2).sum())
            if edge and t.name == "blk.0.ffn_up.weight":  # the special rows: exactly llama.cpp's bytes; the
                # 1e-20 row (4) only decodes to 0: its float32 products are subnormal (~1e-40), so a llama.cpp
                # built to flush those to zero would pick other (unused: d = dmin = 0) sub-block scales
                rows = [0, 1, 2, 3, 5, 6]
                np.testing.assert_array_equal(ours.reshape(x.shape[0], -1)[rows], theirs.reshape(x.shape[0], -1)[rows])
                assert (back[0] == 0).all() and (back[4] == 0).all()
        assert total > 100
        # measured: every block identical; 1% left for a llama.cpp build whose float rounding differs (FMA)
        assert same / total >= 0.99, (qtype, src.name, same, total)
        assert abs(np.sqrt(err_ours / err_theirs) - 1) < 1e-3, (qtype, src.name, err_ours, err_theirs)


def test_rows_that_are_not_whole_blocks_fall_back_as_in_llama_cpp(tmp_path):
    """dim 64 (not a multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0), ffn 80 (ffn_down rows of 80: not even 32,
    so F16), tied embeddings (the token embedding is quantized as the output matrix)."""
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", "model.ffn_dim=80",
                           "model.tie_embeddings=true"]).model
    write_gguf(ParamsSource(random_params(Arch.from_config(m), seed=2), m), tmp_path / "f32.gguf", "f32")
    for kind in ("q4_k_m", "q4_k", "q6_k"):
        ours = tmp_path / f"{kind}.gguf"
        assert main(["convert", str(tmp_path / "f32.gguf"), str(ours), "--to", "gguf", "--gguf-type", kind]) == 0
        llama_quantize(tmp_path / "f32.gguf", tmp_path / f"llama-cpp-{kind}.gguf", kind)
        types = tensor_types(ours)
        assert types == tensor_types(tmp_path / f"llama-cpp-{kind}.gguf"), kind
        assert types["blk.0.ffn_down.weight"] == "F16"
    assert tensor_types(tmp_path / "q4_k_m.gguf")["token_embd.weight"] == "Q8_0"
    assert tensor_types(tmp_path / "q4_k_m.gguf")["blk.1.attn_q.weight"] == "Q5_0"


def test_bad_gguf_type_is_one_line_error(tmp_path, capsys):
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "none"), str(tmp_path / "x.gguf"), "--to", "gguf",
                 "--gguf-type", "q3_k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gguf-type: 'q3_k' is not one of" in err and "q4_k_m" in err, err
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " ".join(GGUF_TYPES) in help_text  # the help lists what convert() accepts
