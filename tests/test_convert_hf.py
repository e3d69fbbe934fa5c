"""Hugging Face conversion: transformers loads what we write and agrees on logits; round trips; bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import ARCH_CASES, random_params
from jaxllama.cli import main
from jaxllama.config import load_config
from jaxllama.convert import convert, load_model
from jaxllama.convert.common import BF16, Extras, ParamsSource
from jaxllama.convert.hf import HFSource, write_hf
from jaxllama.convert.safetensors_io import SafetensorsFile
from jaxllama.errors import ConfigError
from jaxllama.model.llama import Arch, Llama


def model_cfg(*overrides):
    return load_config(None, ["model.preset=debug", "data.seq_len=32", *overrides]).model


def write_random_hf(path, overrides=(), seed=0, shard_size=30_000, extras=None):
    m = model_cfg(*overrides)
    params = random_params(Arch.from_config(m), seed=seed)
    write_hf(ParamsSource(params, m, extras), path, shard_size=shard_size)
    return params, m


def our_logits(m, params, tokens, positions):
    return np.asarray(Llama(Arch.from_config(m)).apply({"params": params}, tokens, positions))


def all_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        sf = SafetensorsFile(f)
        out.update({k: np.array(sf.get(k)) for k in sf.keys()})
    return out


@pytest.mark.parametrize("case", ARCH_CASES)
def test_transformers_loads_our_output_and_logits_match(tmp_path, case):
    params, m = write_random_hf(tmp_path / "hf", ARCH_CASES[case], seed=len(case))
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # small shard size: several files
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, m.vocab_size, size=(2, 20))
    positions = np.arange(20)[None].repeat(2, 0) + np.array([[0], [150]])
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
    ours = our_logits(m, params, tokens, positions)
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # ... and reading the folder back gives the same tree
    loaded = load_model(str(tmp_path / "hf"))
    assert loaded.model_cfg == m
    np.testing.assert_array_equal(loaded.params["layers"]["self_attn"]["q_proj"]["kernel"],
                                  params["layers"]["self_attn"]["q_proj"]["kernel"])


def _rewrite_config(folder, style):
    cfg = json.loads((folder / "config.json").read_text())
    if style == "4.x":
        cfg.pop("rope_parameters")
        if cfg["rope_scaling"]:
            cfg["rope_scaling"]["type"] = cfg["rope_scaling"].pop("rope_type")  # the oldest spelling
    else:
        cfg.pop("rope_theta"), cfg.pop("rope_scaling")
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("style", ["4.x", "5.x"])
def test_reads_both_config_styles(tmp_path, style):
    _, m = write_random_hf(tmp_path / "hf", ARCH_CASES["llama3_rope"], shard_size=10**9)
    _rewrite_config(tmp_path / "hf", style)
    assert HFSource(tmp_path / "hf").model_cfg == m


def test_round_trip_through_jaxllama_is_identical_via_cli(tmp_path):
    write_random_hf(tmp_path / "hf", ARCH_CASES["gqa"], extras=Extras(bos_token_id=1, eos_token_id=2))
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                    "eos_token_id": 2}
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "jx"), "--to", "jaxllama"]) == 0
    loaded = load_model(str(tmp_path / "jx"))
    assert loaded.chat_template == "{{ messages }}" and loaded.tokenizer_path == str(tmp_path / "jx" / "tokenizer")
    assert main(["convert", str(tmp_path / "jx"), str(tmp_path / "hf2"), "--to", "hf", "--shard-size", "30KB"]) == 0
    a, b = all_tensors(tmp_path / "hf"), all_tensors(tmp_path / "hf2")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / f).read_text() == (tmp_path / "hf2" / f).read_text(), f


def test_bin_weights_and_bfloat16_output(tmp_path):
    params, m = write_random_hf(tmp_path / "hf", ARCH_CASES["tied"], shard_size=10**9)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    binf = tmp_path / "bin"
    binf.mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", binf / "config.json")
    torch.save(hf.state_dict(), binf / "pytorch_model.bin")
    loaded = load_model(str(binf))
    np.testing.assert_array_equal(loaded.params["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    convert(str(binf), str(tmp_path / "bf16"), "hf", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    emb = all_tensors(tmp_path / "bf16")["model.embed_tokens.weight"]
    assert emb.dtype == BF16
    np.testing.assert_array_equal(emb, params["embed_tokens"]["embedding"].astype(BF16))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")  # transformers reads our bf16 safetensors
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16


# ---- bad input: one line naming the file and key/tensor; nothing half-written ---------------------------


def _corrupt(folder, how):
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if how == "missing_key":
        del cfg["hidden_size"]
    elif how == "other_arch":
        cfg["model_type"] = "mistral"
    elif how == "attention_bias":
        cfg["attention_bias"] = True
    elif how == "shape":
        cfg["intermediate_size"] = 100
    elif how == "truncated":
        last = sorted(folder.glob("*.safetensors"))[-1]
        last.write_bytes(last.read_bytes()[:-100])
    elif how == "missing_tensor":
        cfg["num_hidden_layers"] = 3
    elif how == "bad_header":
        f = sorted(folder.glob("*.safetensors"))[0]
        head = b'{"model.norm.weight": {"dtype": "F32"}}'
        f.write_bytes(len(head).to_bytes(8, "little") + head)
    elif how == "missing_shard":
        sorted(folder.glob("*.safetensors"))[0].unlink()
    cfg_path.write_text(json.dumps(cfg))


BAD = {
    "missing_key": ["config.json", "hidden_size"],
    "other_arch": ["config.json", "mistral"],
    "attention_bias": ["config.json", "attention_bias"],
    "shape": ["mlp.gate_proj.weight", "(96, 64)"],
    "truncated": [".safetensors", "truncated"],
    "missing_tensor": ["model.layers.2.", "not found"],
    "bad_header": ["model.safetensors", "corrupt safetensors header"],
    "missing_shard": ["model.safetensors.index.json", "model-00001-of-", "missing"],
}


@pytest.mark.parametrize("how", BAD)
def test_bad_input_is_one_line_naming_the_file_and_nothing_is_left(tmp_path, capsys, how):
    write_random_hf(tmp_path / "hf", shard_size=30_000 if how in ("truncated", "missing_shard") else 10**9)
    _corrupt(tmp_path / "hf", how)
    before = set(tmp_path.iterdir())
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for piece in BAD[how]:
        assert piece in err, (piece, err)
    assert set(tmp_path.iterdir()) == before  # no DST, no temporary folder


def test_unknown_format_and_existing_destination(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(["convert", str(tmp_path / "junk"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "unknown checkpoint format" in capsys.readouterr().err
    write_random_hf(tmp_path / "hf", shard_size=10**9)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "junk"), "--to", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "x"), "--to", "hf", "--shard-size", "lots"]) == 2
    assert "--shard-size" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no such file"):
        load_model(str(tmp_path / "nothing"))


@pytest.mark.parametrize("to", ["hf", "gguf", "meta", "jaxllama"])
def test_failure_midway_leaves_no_destination(tmp_path, capsys, to):
    """The last layer's tensor is the wrong shape: the writer has already written earlier tensors when it fails."""
    from jaxllama.convert.safetensors_io import write_safetensors

    write_random_hf(tmp_path / "hf", shard_size=10**9)
    f = tmp_path / "hf" / "model.safetensors"
    sf = SafetensorsFile(f)
    tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
    tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((64, 95), np.float32)
    del sf
    f.unlink()
    write_safetensors(f, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)
    before = set(tmp_path.iterdir())
    dst = tmp_path / ("out.gguf" if to == "gguf" else "out")
    assert main(["convert", str(tmp_path / "hf"), str(dst), "--to", to]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: model.layers.1.mlp.down_proj.weight: shape (64, 95)" in err, err
    assert set(tmp_path.iterdir()) == before
