"""train.init_from: fine-tuning starts from converted weights (any format), sharded, optimizer fresh."""

import jax
import numpy as np
import pytest

from helpers import flat_arrays, random_params
from jaxllama.checkpoint import save_params
from jaxllama.config import load_config
from jaxllama.convert.common import ParamsSource
from jaxllama.convert.gguf_format import write_gguf
from jaxllama.convert.hf import write_hf
from jaxllama.errors import ConfigError
from jaxllama.model.llama import Arch
from jaxllama.train.loop import Trainer, train

BASE = ["model.preset=debug", "data.source=synthetic", "data.seq_len=32", "data.global_batch=8",
        "train.tensorboard=false", "train.progress=false", "mesh.fsdp=4", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One random model written as Hugging Face, GGUF (f32) and jaxllama params."""
    d = tmp_path_factory.mktemp("init")
    m = load_config(None, BASE).model
    params = random_params(Arch.from_config(m), seed=3)
    write_hf(ParamsSource(params, m), d / "hf")
    write_gguf(ParamsSource(params, m), d / "m.gguf", "f32")
    save_params(str(d / "jx"), params, m)
    return d, params


@pytest.mark.parametrize("fmt", ["hf", "m.gguf", "jx"])
def test_initial_params_are_the_checkpoints_in_this_runs_shards(weights, fmt):
    d, params = weights
    cfg = load_config(None, [*BASE, f"train.init_from={d / fmt}"])
    trainer = Trainer.build(cfg, init=False)
    trainer.initialize(say=lambda _: None)
    got = trainer.state.params
    want = flat_arrays(params)
    for k, v in flat_arrays(got).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    leaf = got["layers"]["mlp"]["up_proj"]["kernel"]
    assert leaf.sharding == trainer.state_shardings.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert leaf.addressable_shards[0].data.shape != leaf.shape  # split over the mesh, not replicated
    assert int(trainer.state.step) == 0
    opt = jax.tree.leaves(trainer.state.opt_state)  # moments and counts: a fresh optimizer is all zeros
    assert len(opt) > 2 * len(want) - 1 and all(not np.any(np.asarray(x)) for x in opt)


def test_training_from_hf_and_jaxllama_weights_starts_from_the_same_loss(weights, tmp_path):
    d, _ = weights

    def first_loss(name, *extra, out=lambda _: None):
        cfg = load_config(None, [*BASE, *extra, "train.steps=1", "train.log_every=1", f"run_dir={tmp_path / name}",
                                 "checkpoint.enabled=false"])
        return train(cfg, out=out)["history"][0]["loss"]

    lines = []
    from_hf = first_loss("hf", f"train.init_from={d / 'hf'}", out=lines.append)
    from_jx = first_loss("jx", f"train.init_from={d / 'jx'}")
    scratch = first_loss("scratch")
    assert any(f"initialized the parameters from {d / 'hf'}" in x for x in lines)
    assert abs(from_hf - from_jx) < 1e-5 and abs(from_hf - scratch) > 1e-2, (from_hf, from_jx, scratch)


def test_mismatched_or_missing_checkpoints_are_one_line_errors(weights, tmp_path):
    d, _ = weights
    cfg = load_config(None, [*BASE, f"train.init_from={d / 'hf'}", "model.ffn_dim=160", "model.n_layers=3"])
    with pytest.raises(ConfigError, match=r"model.n_layers: checkpoint 2, config 3; model.ffn_dim: checkpoint"):
        Trainer.build(cfg, init=False).initialize(say=lambda _: None)
    with pytest.raises(ConfigError, match=r"train.init_from: .*nothing: no such file"):  # before anything is built
        load_config(None, [*BASE, f"train.init_from={tmp_path / 'nothing'}"])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"train.init_from: .*notes.txt"):
        Trainer.build(load_config(None, [*BASE, f"train.init_from={tmp_path / 'notes.txt'}"]),
                      init=False).initialize(say=lambda _: None)
    said = []
    cfg = load_config(None, [*BASE, f"train.init_from={d / 'jx'}", "model.rope_theta=50000"])
    Trainer.build(cfg, init=False).initialize(say=said.append)
    assert len(said) == 1 and "model.rope_theta: checkpoint 10000.0, config 50000.0" in said[0]
