"""Weight-only quantized inference (``--quantize int8|int4``) on a model trained for real.

References: the float model's own perplexity and logits on held-out text (quantization is judged by
how far it moves them), the quantizer's definition (each weight within half a step of its float), and
the unsharded run for the sharded one.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.cli import main
from jaxllama.convert import load_model
from jaxllama.infer.placement import inference_arch, inference_program, place_params, quantize_for_inference
from jaxllama.model import quant
from jaxllama.model.llama import Arch, Llama, model_params

PROMPT = "def main():\n    "
EVAL = ["--data", "stdlib", "--seq-len", "64", "--batch", "8", "--max-batches", "3"]


def run_json(capsys, *argv):
    capsys.readouterr()
    assert main(list(argv)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_perplexity_deltas_within_goals(trained_tiny, capsys):
    """int8 (per output channel) within +0.5% perplexity of float32 on held-out text, int4 (group 128)
    within +5% (its embedding and LM head int8): the issue's goals, through ``jaxllama eval``."""
    [f32] = run_json(capsys, "eval", str(trained_tiny), *EVAL)
    assert f32["perplexity"] < 1000  # trained: below the vocabulary's 2048 (an untrained model is above it)
    got = {}
    for mode, group in (("int8", None), ("int4", 128), ("int4", 32)):
        [r] = run_json(capsys, "eval", str(trained_tiny), *EVAL, "--quantize", mode,
                       *(["--group-size", str(group)] if group else []))
        assert r["tokens"] == f32["tokens"] and r["quantize"] == mode
        got[(mode, group)] = r["perplexity"] / f32["perplexity"] - 1
    # On this small model a delta is within +-0.2% of either sign (benchmarks/quant_quality.py measures KL
    # too); the goals are bounds on the rise, and every mode must actually change the numbers.
    assert all(d != 0 for d in got.values()), got
    assert got[("int8", None)] < 0.005 and got[("int4", 128)] < 0.05 and got[("int4", 32)] < 0.05, got


@pytest.mark.parametrize("mode, group", [("int8", 0), ("int4", 64)])
def test_quantized_weights_and_logits(trained_tiny, mode, group):
    """Every quantized weight is within half a quantization step of its float value, the values use
    the mode's range, and the model's logits stay close to the float model's."""
    loaded = load_model(str(trained_tiny))
    a = inference_arch(Arch.from_config(loaded.model_cfg), "float32", scan_layers=False)
    prog = inference_program(a, {"data": 1, "fsdp": 1, "tensor": 1})
    shardings = prog.model_params(prog.params_shardings)
    params = place_params(model_params(loaded.params, a), a, prog.layout, shardings)
    qp, qa = quantize_for_inference(params, a, prog.layout, mode, group)
    assert qa.quantize == mode and qa.quant_embed
    w = np.asarray(params["layers_1"]["mlp"]["down_proj"]["kernel"])  # [in, out]
    node = qp["layers_1"]["mlp"]["down_proj"]
    assert set(node) == {"kernel_q", "kernel_scale"} and node["kernel_q"].dtype == quant.QDTYPE[mode]
    scale = np.asarray(node["kernel_scale"])
    assert scale.shape == (w.shape[1], 1 if group == 0 else w.shape[0] // group)
    levels = np.asarray(quant.unpack(node["kernel_q"], mode, scale.shape[-1]))
    assert levels.min() >= (-127 if mode == "int8" else -8) and levels.max() <= (127 if mode == "int8" else 7)
    deq = np.asarray(quant.dequantize(node["kernel_q"], node["kernel_scale"], mode))
    step = np.repeat(scale, w.shape[0] // scale.shape[-1], axis=-1).T
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)
    emb = qp["embed_tokens"]["embedding_q"]  # the tied embedding / LM head is quantized too, int4's at int8
    assert emb.dtype == np.int8 and qp["embed_tokens"]["embedding_scale"].shape[-1] == 1
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, a.vocab_size, (2, 48)))
    ref = np.asarray(Llama(a).apply({"params": params}, tokens))
    got = np.asarray(Llama(qa).apply({"params": qp}, tokens))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < (0.02 if mode == "int8" else 0.15), rel
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) > (0.95 if mode == "int8" else 0.8)


@pytest.mark.parametrize("mode, group", [("int8", None), ("int4", 64)])
def test_sharded_quantized_decoding_equals_unsharded(trained_tiny, capsys, mode, group):
    """tensor=2 x data=2 (scales sharded with their kernels' output axis) gives the unsharded tokens and
    log-probabilities."""
    args = ["generate", str(trained_tiny), "--prompt", PROMPT, "--prompt", "import os", "--temperature", "0",
            "--max-new-tokens", "12", "--quantize", mode, *(["--group-size", str(group)] if group else []), "--json"]
    one = run_json(capsys, *args, "--mesh", "data=1,tensor=1")
    four = run_json(capsys, *args, "--mesh", "data=2,tensor=2")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in four]
    np.testing.assert_allclose([r["logprobs"] for r in one], [r["logprobs"] for r in four], atol=1e-4)


def test_int8_greedy_text_matches_float(trained_tiny, capsys):
    args = ["generate", str(trained_tiny), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "16",
            "--json"]
    [f32] = run_json(capsys, *args)
    [int8] = run_json(capsys, *args, "--quantize", "int8")
    assert int8["tokens"][:8] == f32["tokens"][:8]


def test_convert_stores_quantized_and_loads_without_requantizing(trained_tiny, tmp_path, capsys):
    """``convert --to jaxllama --quantize int4`` stores the packed values and scales; generate runs them
    as stored (the same tokens as quantizing at load), and converting on to HF dequantizes."""
    dst = tmp_path / "q4"
    assert main(["convert", str(trained_tiny), str(dst), "--to", "jaxllama", "--quantize", "int4",
                 "--group-size", "64"]) == 0
    stored = load_model(str(dst), keep_quantized=True).params
    node = stored["layers"]["self_attn"]["q_proj"]
    assert node["kernel_q"].dtype == np.uint8 and node["kernel_scale"].shape[-1] == 256 // 64
    assert "embedding_q" in stored["embed_tokens"] and quant.detect(stored) == ("int4", 64)
    args = ["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "10", "--json"]
    [live] = run_json(capsys, "generate", str(trained_tiny), *args, "--quantize", "int4", "--group-size", "64")
    [as_stored] = run_json(capsys, "generate", str(dst), *args)
    assert as_stored["tokens"] == live["tokens"]
    assert main(["convert", str(dst), str(tmp_path / "hf"), "--to", "hf"]) == 0
    from safetensors.numpy import load_file

    hf = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        hf.update(load_file(f))
    from serve_helpers import running_server

    with running_server(dst, "--slots", "2", "--max-len", "64", "--chunk", "16") as url:  # served as stored
        import httpx

        r = httpx.post(f"{url}/v1/completions", json={"model": str(dst), "prompt": PROMPT, "max_tokens": 10,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == live["text"]
    up = stored["layers"]["mlp"]["up_proj"]
    want = np.asarray(quant.dequantize(up["kernel_q"][0], up["kernel_scale"][0], "int4"))
    np.testing.assert_allclose(hf["model.layers.0.mlp.up_proj.weight"].T, want, rtol=1e-6, atol=1e-7)


BAD = [
    (["generate", "{run}", "--prompt", "x", "--quantize", "int3"], "--quantize: invalid choice: 'int3'"),
    (["generate", "{run}", "--prompt", "x", "--quantize", "int4", "--group-size", "100"],
     "--group-size: the int4 group size 100 must divide"),
    (["generate", "{run}", "--prompt", "x", "--quantize", "int4", "--group-size", "0"], "--group-size 0"),
    (["generate", "{run}", "--prompt", "x", "--group-size", "64"], "--group-size applies only with --quantize"),
    (["eval", "{run}", "--data", "stdlib", "--quantize", "int4", "--group-size", "7"], "must divide"),
    (["convert", "{run}", "{tmp}/x", "--to", "hf", "--quantize", "int8"], "apply only to --to jaxllama"),
    (["convert", "{run}", "{tmp}/x", "--to", "jaxllama", "--quantize", "int4", "--group-size", "3"], "must divide"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_quantize_input_is_one_line(trained_tiny, tmp_path, capsys, argv, message):
    argv = [a.format(run=trained_tiny, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxllama: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()
