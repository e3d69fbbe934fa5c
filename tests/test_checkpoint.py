"""Checkpoints in one process: params-only save/load, exact resume, retention, damage, other meshes, errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.checkpoint import load_params, save_params
from jaxllama.cli import main as cli_main
from jaxllama.config import load_config
from jaxllama.data.synthetic import SyntheticSource
from jaxllama.errors import ConfigError
from jaxllama.train.loop import Trainer, train

BASE = ["model.preset=debug", "data.source=synthetic", "data.seq_len=32", "data.global_batch=8", "train.log_every=1",
        "train.tensorboard=false", "train.progress=false", "optim.warmup_steps=2", "train.peak_flops=1e9"]


def cfg_for(run_dir, *overrides):
    return load_config(None, [*BASE, f"run_dir={run_dir}", *overrides])


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def arrays_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


class CrashAfter(SyntheticSource):
    """Raises after handing out ``limit`` batches: a run that dies mid-way (its saves already started)."""

    def __init__(self, *args, limit: int, **kw):
        super().__init__(*args, **kw)
        self.limit = limit

    def __next__(self):
        if self.position >= self.limit:
            raise RuntimeError("simulated crash")
        return super().__next__()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted 6-step run saving every 2 steps: the reference for resume tests."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(cfg_for(run, "train.steps=6", "checkpoint.every=2"), out=lambda _: None)
    return run


def test_params_only_roundtrip_onto_a_mesh_and_dtype(tmp_path, make_cfg):
    cfg = make_cfg("mesh.data=2", "mesh.fsdp=4")
    trainer = Trainer.build(cfg)
    save_params(str(tmp_path / "p"), trainer.state.params, cfg.model)
    params, model_cfg = load_params(str(tmp_path / "p"))
    assert model_cfg == cfg.model
    assert arrays_equal(params, trainer.state.params)
    sharded, _ = load_params(str(tmp_path / "p"), shardings=trainer.state_shardings.params, dtype=jnp.bfloat16)
    leaf = sharded["layers"]["mlp"]["up_proj"]["kernel"]
    assert leaf.dtype == jnp.bfloat16 and leaf.sharding == trainer.state_shardings.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert leaf.addressable_shards[0].data.shape != leaf.shape  # really split, not replicated
    ref = trainer.state.params["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref.astype(jnp.bfloat16)))
    numpy_params = jax.tree.map(np.asarray, trainer.state.params)  # converters hand over numpy trees
    save_params(str(tmp_path / "np"), numpy_params, cfg.model)
    assert arrays_equal(load_params(str(tmp_path / "np"))[0], numpy_params)


def test_params_bad_paths(tmp_path, make_cfg):
    cfg = make_cfg()
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        save_params(str(tmp_path / "exists"), {"w": np.zeros(2)}, cfg.model)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_params(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a jaxllama checkpoint"):
        load_params(str(tmp_path / "exists"))


def test_resume_after_crash_is_bitwise_exact(tmp_path, finished_run):
    run = tmp_path / "run"
    cfg = cfg_for(run, "train.steps=6", "checkpoint.every=2")
    src = CrashAfter(cfg.model.vocab_size, 32, 8, seed=0, limit=3)  # dies fetching the batch of step 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, source=src, out=lambda _: None)
    assert sorted(losses(run)) == [1, 2, 3]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 4.1')  # a record cut short by the kill
    lines = []
    summary = train(cfg_for(run, "train.steps=6", "checkpoint.every=2"), out=lines.append)
    assert summary["resumed_from"] == 2 and any("resumed from the checkpoint at step 2" in x for x in lines)
    ref, got = losses(finished_run), losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # step 3 was logged by the crashed run, then re-logged once
    assert got == ref  # bitwise equal floats
    data_file = run / "checkpoints" / "6" / "data" / "process_0-of-1.json"
    assert json.loads(data_file.read_text()) == {"position": 6}  # six batches consumed, none twice
    params, model_cfg = load_params(str(run))  # a run dir resolves to its latest step
    ref_params, _ = load_params(str(finished_run / "checkpoints" / "6"))
    assert model_cfg.dim == 64 and arrays_equal(params, ref_params)


def test_keep_and_keep_every(tmp_path):
    run = tmp_path / "run"
    train(cfg_for(run, "train.steps=6", "checkpoint.every=1", "checkpoint.keep=2", "checkpoint.keep_every=3",
                  "checkpoint.async_save=false"), out=lambda _: None)
    kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [3, 5, 6]


def test_shape_mismatch_names_the_fields(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.raises(ConfigError, match=r"model\.ffn_dim: checkpoint 96, config 128"):
        train(cfg_for(run, "train.steps=6", "model.ffn_dim=128"), out=lambda _: None)
    rc = cli_main(["train", *BASE, f"run_dir={run}", "model.n_layers=3"])
    assert rc == 2 and "model.n_layers: checkpoint 2, config 3" in capsys.readouterr().err


def test_no_resume_refuses_an_existing_run(tmp_path, finished_run, capsys):
    before = (finished_run / "config.yaml").read_text()
    rc = cli_main(["train", "--no-resume", *BASE, f"run_dir={finished_run}", "train.steps=6"])
    err = capsys.readouterr().err
    assert rc == 2 and "already has checkpoints (latest step 6)" in err and str(finished_run) in err
    assert (finished_run / "config.yaml").read_text() == before  # nothing touched


def test_bad_checkpoint_config_values():
    with pytest.raises(ConfigError, match="checkpoint.keep: must be positive"):
        load_config(None, ["checkpoint.keep=0"])
    with pytest.raises(ConfigError, match="checkpoint.every: must be >= 0"):
        load_config(None, ["checkpoint.every=-1"])


def test_resume_with_another_process_count_is_refused(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    meta = run / "checkpoints" / "6" / "train" / "metadata"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "process_count": 2}))  # as if two processes had written it
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1"):
        train(cfg_for(run, "train.steps=6"), out=lambda _: None)
    assert (run / "checkpoints" / "6").is_dir()  # refused, not treated as damage


def test_save_blocking_time_is_logged(finished_run):
    rows = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()]
    blocked = {r["step"]: r["checkpoint_block_s"] for r in rows if "checkpoint_block_s" in r}
    assert sorted(blocked) == [2, 4, 6] and all(0 < v < 60 for v in blocked.values())


def test_open_params_reads_one_layer_at_a_time_from_a_training_run(finished_run, tmp_path):
    """Conversion's reader: lazy TensorStore handles over the run's latest step, values equal to Orbax's."""
    from jaxllama.checkpoint.params import LazyArray, open_params

    arrays, model_cfg = open_params(str(finished_run))
    params, cfg2 = load_params(str(finished_run))
    assert model_cfg == cfg2
    flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(arrays) == set(flat) and all(isinstance(a, LazyArray) for a in arrays.values())
    gate = arrays["layers/mlp/gate_proj/kernel"]
    assert gate[1].shape == gate.shape[1:]  # one layer read, not the stack
    for k, v in flat.items():
        np.testing.assert_array_equal(np.asarray(arrays[k]), np.asarray(v), err_msg=k)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # stored bf16 reads back as bf16
    save_params(str(tmp_path / "bf16"), bf16, model_cfg)
    emb = open_params(str(tmp_path / "bf16"))[0]["embed_tokens/embedding"]
    assert emb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(emb[:3], np.asarray(bf16["embed_tokens"]["embedding"][:3]))


def test_unrolled_layers_save_the_canonical_tree_and_resume_either_way(tmp_path, finished_run):
    """model.scan_layers=false: a crashed run resumes bitwise like a scanned one; its checkpoint holds
    the canonical stacked tree (the scanned run's), so a run resumes under the other setting too."""
    unrolled = ("train.steps=4", "checkpoint.every=2", "model.scan_layers=false")
    train(cfg_for(tmp_path / "ref", *unrolled), out=lambda _: None)
    run = tmp_path / "run"
    cfg = cfg_for(run, *unrolled)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, source=CrashAfter(cfg.model.vocab_size, 32, 8, seed=0, limit=3), out=lambda _: None)
    shutil.copytree(run, tmp_path / "other")
    train(cfg_for(run, *unrolled), out=lambda _: None)
    assert losses(run) == losses(tmp_path / "ref")  # bitwise
    stored, _ = load_params(str(run))
    scanned, _ = load_params(str(finished_run / "checkpoints" / "4"))
    assert jax.tree.structure(stored) == jax.tree.structure(scanned)
    assert jax.tree.map(np.shape, stored) == jax.tree.map(np.shape, scanned)
    # the same seed and data: unrolled and scanned runs agree up to float32 reduction order (up to
    # step 3: the reference's 6-step schedule decays differently from then on)
    np.testing.assert_allclose([losses(run)[s] for s in (1, 2, 3)], [losses(finished_run)[s] for s in (1, 2, 3)],
                               rtol=1e-5)
    lines = []  # the unrolled run's step-2 checkpoint, resumed with scanned layers
    train(cfg_for(tmp_path / "other", "train.steps=4", "checkpoint.every=2"), out=lines.append)
    assert any("resumed from the checkpoint at step 2" in x for x in lines)
    np.testing.assert_allclose(losses(tmp_path / "other")[4], losses(run)[4], rtol=1e-5)


def test_reading_a_params_dir_with_its_tokenizer_warns_nothing(tmp_path, make_cfg, caplog):
    """A converted params dir keeps its tokenizer beside the Orbax items: reading it is silent (Orbax
    once warned twice per conversion that it could not restore the item "tokenizer")."""
    import logging

    from helpers import random_params
    from jaxllama.model.llama import Arch

    m = make_cfg().model
    save_params(str(tmp_path / "p"), random_params(Arch.from_config(m)), m)
    (tmp_path / "p" / "tokenizer").mkdir()
    (tmp_path / "p" / "tokenizer" / "tokenizer.model").write_bytes(b"pieces")
    with caplog.at_level(logging.WARNING):
        load_params(str(tmp_path / "p"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


def test_resume_says_which_settings_changed(tmp_path):
    run = tmp_path / "run"
    train(cfg_for(run, "train.steps=2"), out=lambda _: None)
    lines = []
    train(cfg_for(run, "train.steps=3", "optim.lr=1e-3"), out=lines.append)
    [said] = [x for x in lines if x.startswith("resumed with settings changed")]
    assert "train.steps: 2 -> 3" in said and "optim.lr: 0.003 -> 0.001" in said
    assert "steps: 3" in (run / "config.yaml").read_text()
