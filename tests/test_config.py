"""Config loading, overrides, and the one-line errors for bad input."""

import pytest
import yaml

from jaxllama.config import config_from_dict, load_config, save_config
from jaxllama.parallel.mesh import MeshPlan
from jaxllama.program import build_program
from jaxllama.errors import ConfigError


def test_defaults_are_the_tiny_demo():
    cfg = load_config()
    assert cfg.model.preset == "tiny" and cfg.data.source == "stdlib"
    assert cfg.model.dim == 256 and cfg.model.head_dim == 32  # resolved from the preset


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: llama3-8b\n  n_layers: 2\noptim:\n  lr: 1e-4\ntrain:\n  steps: 7\n")
    cfg = load_config(f, ["train.steps=9", "optim.lr=3e-4", "mesh.fsdp=-1", "model.dtype=bfloat16"])
    assert (cfg.model.n_layers, cfg.model.dim, cfg.train.steps, cfg.optim.lr) == (2, 4096, 9, 3e-4)
    assert cfg.model.dtype == "bfloat16"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=llama3.2-1b", "train.steps=3", "data.seq_len=64"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


@pytest.mark.parametrize("overrides, words", [
    (["train.stepz=5"], ["train.stepz", "did you mean train.steps"]),
    (["model.preset=llama9-1t"], ["model.preset", "llama3-8b"]),
    (["train.steps=banana"], ["train.steps", "integer"]),
    (["data.seq_len=-4"], ["data.seq_len", "positive"]),
    (["data.seq_len=5000"], ["data.seq_len", "model.max_position"]),
    (["optim.lr=fast"], ["optim.lr", "number"]),
    (["optim.schedule=linear"], ["optim.schedule", "cosine"]),
    (["model.remat=some"], ["model.remat", "save_dots"]),
    (["model.attention=flash"], ["model.attention", "splash"]),
    (["model.n_kv_heads=3"], ["model.n_kv_heads", "model.n_heads"]),
    (["mesh.data=-1", "mesh.fsdp=-1"], ["mesh", "at most one"]),
    (["mesh.rules=[[batch, pod]]"], ["mesh.rules[0]"]),
    (["train"], ["key=value"]),
    (["model=3"], ["model", "section"]),
    (["train.grad_accum=3"], ["train.grad_accum", "data.global_batch"]),
    (["model.tie_embeddings=maybe"], ["model.tie_embeddings", "true or false"]),
])
def test_bad_values_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("overrides, n, words", [
    (["mesh.tensor=3", "mesh.data=1", "mesh.fsdp=1"], 8, ["mesh", "3", "8"]),
    (["mesh.data=3", "mesh.fsdp=-1"], 8, ["mesh", "cannot fill"]),
    (["data.global_batch=7", "mesh.data=8"], 8, ["data.global_batch=7", "8"]),
    (["mesh.tensor=8", "mesh.fsdp=1"], 8, ["kv_heads=4", "tensor=8"]),  # tiny: 8 heads, 4 kv heads
    (["mesh.dcn_data=3"], 8, ["dcn"]),
])
def test_mesh_checks_need_the_device_count(overrides, n, words):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as e:
        build_program(cfg, n)  # an abstract mesh of n devices
    for w in words:
        assert w in str(e.value)


def test_mesh_fill():
    assert MeshPlan.resolve(load_config(None, ["mesh.data=2", "mesh.fsdp=-1"]).mesh, 8).shape == \
        {"data": 2, "fsdp": 4, "tensor": 1}


def test_bad_yaml_file_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  preset: tiny\n  dim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "unknown.yaml").write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(tmp_path / "unknown.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
