"""Meta consolidated checkpoints: sharded import (Llama 2 and Llama 3 layouts), export, round trips.

The Meta checkpoints here are built by the test itself from a Hugging Face state dict, with the
inverse of the q/k permutation in transformers' historical ``convert_llama_weights_to_hf.py`` and
Meta's model-parallel split axes (ColumnParallel: rows, RowParallel: columns, ParallelEmbedding:
features for Llama 2, VocabParallelEmbedding: rows for Llama 3) -- not with our exporter.
"""

import json

import numpy as np
import pytest
import torch

from helpers import flat_arrays, random_params
from jaxllama.cli import main
from jaxllama.config import load_config
from jaxllama.convert import load_model
from jaxllama.convert.hf_names import to_hf_tensors
from jaxllama.model.llama import Arch

# multiple_of / ffn_dim_multiplier as published (256; 1.3 x 1024), so params.json round-trips exactly.
LLAMA2 = dict(overrides=["model.ffn_dim=256", "model.n_heads=4", "model.n_kv_heads=4"],
              params={"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 256, "norm_eps": 1e-5,
                      "vocab_size": -1}, embed_axis=1)
LLAMA3 = dict(overrides=["model.ffn_dim=1024", "model.rope_theta=500000", "model.rope_type=llama3",
                         "model.rope_factor=8", "model.max_position=131072"],
              params={"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128,
                      "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
                      "use_scaled_rope": True}, embed_axis=0)

META_NAMES = {"self_attn.q_proj": ("attention.wq", 0), "self_attn.k_proj": ("attention.wk", 0),
              "self_attn.v_proj": ("attention.wv", 0), "self_attn.o_proj": ("attention.wo", 1),
              "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.up_proj": ("feed_forward.w3", 0),
              "mlp.down_proj": ("feed_forward.w2", 1), "input_layernorm": ("attention_norm", None),
              "post_attention_layernorm": ("ffn_norm", None)}


def hf_to_meta_qk(w, n_heads):
    """Inverse of transformers' permute(w, n_heads, dim1, dim2) for Meta -> HF."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def build_meta(folder, spec, n_shards, seed=0):
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", *spec["overrides"]]).model
    a = Arch.from_config(m)
    params = random_params(a, seed=seed)
    full = {}
    for name, arr in to_hf_tensors(params, a):
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if name == "model.embed_tokens.weight":
            full["tok_embeddings.weight"] = (t, spec["embed_axis"])
        elif name == "model.norm.weight":
            full["norm.weight"] = (t, None)
        elif name == "lm_head.weight":
            full["output.weight"] = (t, 0)
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            meta, axis = META_NAMES[rest]
            if rest == "self_attn.q_proj":
                t = hf_to_meta_qk(t, m.n_heads)
            elif rest == "self_attn.k_proj":
                t = hf_to_meta_qk(t, m.n_kv_heads)
            full[f"layers.{layer}.{meta}.weight"] = (t, axis)
    folder.mkdir()
    for k in range(n_shards):
        shard = {n: (t if axis is None else torch.chunk(t, n_shards, dim=axis)[k]).clone()
                 for n, (t, axis) in full.items()}
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
    (folder / "params.json").write_text(json.dumps(spec["params"]))
    (folder / "tokenizer.model").write_bytes(b"spm model bytes")
    return params, m


@pytest.mark.parametrize("spec,n_shards", [(LLAMA2, 1), (LLAMA2, 4), (LLAMA3, 2)], ids=["llama2", "llama2-mp4",
                                                                                       "llama3-mp2"])
def test_import_merges_shards_along_each_weights_axis(tmp_path, spec, n_shards):
    params, m = build_meta(tmp_path / "meta", spec, n_shards)
    loaded = load_model(str(tmp_path / "meta"))
    got = loaded.model_cfg
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "rope_theta",
                "rope_type", "rope_factor", "tie_embeddings"):
        assert getattr(got, key) == getattr(m, key), key
    flat_a = flat_arrays(params)
    flat_b = flat_arrays(loaded.params)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
    assert loaded.tokenizer_path == str(tmp_path / "meta")


@pytest.mark.parametrize("spec", [LLAMA2, LLAMA3], ids=["llama2", "llama3"])
def test_round_trip_meta_jaxllama_meta_with_chosen_shard_count(tmp_path, spec):
    build_meta(tmp_path / "meta", spec, 2)
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "jx"), "--to", "jaxllama"]) == 0
    assert main(["convert", str(tmp_path / "jx"), str(tmp_path / "meta2"), "--to", "meta", "--shards", "2"]) == 0
    for k in range(2):
        a = torch.load(tmp_path / "meta" / f"consolidated.{k:02d}.pth", weights_only=True)
        b = torch.load(tmp_path / "meta2" / f"consolidated.{k:02d}.pth", weights_only=True)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
    p2 = json.loads((tmp_path / "meta2" / "params.json").read_text())
    for key, value in spec["params"].items():
        if key != "vocab_size":  # Llama 2's -1 becomes the real size
            assert p2[key] == value, key
    assert (tmp_path / "meta2" / "tokenizer.model").read_bytes() == b"spm model bytes"
    # a different shard count re-splits; the merged model is the same
    assert main(["convert", str(tmp_path / "meta2"), str(tmp_path / "meta4"), "--to", "meta", "--shards", "1"]) == 0
    one = flat_arrays(load_model(str(tmp_path / "meta4")).params)
    two = flat_arrays(load_model(str(tmp_path / "meta")).params)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)


def test_meta_bad_inputs(tmp_path, capsys):
    build_meta(tmp_path / "meta", LLAMA2, 2)
    pj = tmp_path / "meta" / "params.json"
    good = pj.read_text()
    pj.write_text(json.dumps({k: v for k, v in LLAMA2["params"].items() if k != "n_heads"}))
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "o"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "params.json" in err and "n_heads" in err
    pj.write_text(good)
    (tmp_path / "meta" / "consolidated.01.pth").write_bytes(b"not a zip")
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "o"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "consolidated.01.pth" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "meta" / "consolidated.01.pth").unlink()
    (tmp_path / "meta" / "consolidated.02.pth").write_bytes(b"")
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "o"), "--to", "hf"]) == 2
    assert "are not 00..01" in capsys.readouterr().err
    (tmp_path / "meta" / "consolidated.02.pth").unlink()  # now a single shard of half the columns: shape error
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "o"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "consolidated.00.pth: tok_embeddings.weight: shape (128, 32)" in err
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "o"), "--to", "meta"]) == 2
    assert not (tmp_path / "o").exists()


def test_export_refuses_a_shard_count_that_does_not_divide(tmp_path, capsys):
    build_meta(tmp_path / "meta", LLAMA3, 1)
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "o"), "--to", "meta", "--shards", "3"]) == 2
    assert "--shards 3 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pickles_are_never_unpickled(tmp_path, capsys):
    """A .pth whose pickle would run code is refused by weights_only loading."""
    build_meta(tmp_path / "meta", LLAMA2, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"tok_embeddings.weight": Evil()}, tmp_path / "meta" / "consolidated.00.pth")
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "o"), "--to", "hf"]) == 2
    out = capsys.readouterr()
    assert "pwned" not in out.out and "consolidated.00.pth" in out.err
