"""The one builder: rules are real (replicated KV heads train and generate; any non-dividing split is
one line naming the array and logical axis), the logged lr after a skipped step, the import graph."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import arch_for, random_params
from jaxllama.config import DEFAULT_RULES, load_config, parse_rules, parse_size
from jaxllama.data.synthetic import SyntheticSource
from jaxllama.errors import ConfigError
from jaxllama.infer.engine import Engine
from jaxllama.infer.placement import inference_program, place_params
from jaxllama.infer.sampling import Sampling
from jaxllama.program import CACHE_AXES, build_program
from jaxllama.program.optimizer import make_schedule
from jaxllama.train.loop import train

PACKAGE = Path(__file__).resolve().parents[1] / "jaxllama"
# Replicated KV heads under tensor parallelism (how 8 KV heads run at tensor 16 in MaxText).
KV_WHOLE = [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["heads", "tensor"], ["kv_heads", None],
            ["mlp", "tensor"], ["vocab", "tensor"]]
BASE = ["model.preset=debug", "model.n_heads=8", "model.n_kv_heads=2", "model.head_dim=8", "model.ffn_dim=128",
        "data.source=synthetic", "data.seq_len=32", "data.global_batch=8", "train.steps=3", "train.log_every=1",
        "checkpoint.enabled=false", "train.tensorboard=false", "train.progress=false"]


def rules_override(rules):
    return "mesh.rules=" + json.dumps(rules)


def test_replicated_kv_heads_train_like_one_device(tmp_path):
    one = train(load_config(None, [*BASE, "mesh.fsdp=1", f"run_dir={tmp_path / 'a'}"]), devices=jax.devices()[:1],
                out=lambda _: None)
    cfg = load_config(None, [*BASE, "mesh.fsdp=1", "mesh.tensor=8", rules_override(KV_WHOLE), f"run_dir={tmp_path / 'b'}"])
    program = build_program(cfg)
    k_proj = program.state_shardings.params["layers"]["self_attn"]["k_proj"]["kernel"]
    q_proj = program.state_shardings.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert k_proj.spec[-1] is None and q_proj.spec[-1] == "tensor"  # 2 KV heads whole, 8 query heads split
    assert program.layout.mesh_axes("activation_kv_heads") is None  # the activations follow the weight rule
    eight = train(cfg, out=lambda _: None)
    np.testing.assert_allclose([r["loss"] for r in eight["history"]], [r["loss"] for r in one["history"]],
                               rtol=2e-5)


def test_default_rules_refuse_kv_heads_that_do_not_divide():
    cfg = load_config(None, [*BASE, "mesh.fsdp=1", "mesh.tensor=8"])
    with pytest.raises(ConfigError) as e:
        build_program(cfg, 8)
    msg = str(e.value)
    assert "\n" not in msg and "activations/k_v: activation_kv_heads=2 over tensor=8 does not divide" in msg


@pytest.mark.parametrize("rule, sizes, extra, words", [
    # dimensions the old hard-coded check never looked at (layers), or looked at over tensor only (vocab)
    (["layers", "fsdp"], (4, 2), [], "layers/input_layernorm/scale: layers=2 over fsdp=4 does not divide"),
    (["vocab", ["fsdp", "tensor"]], (4, 2), ["model.vocab_size=196"],
     "embed_tokens/embedding: vocab=196 over fsdp x tensor=8 does not divide"),
    (["mlp", "tensor"], (1, 8), ["model.ffn_dim=100"], "layers/mlp/down_proj/kernel: mlp=100 over tensor=8"),
])
def test_rules_that_do_not_divide_name_the_array_and_axis(rule, sizes, extra, words):
    rules = [rule] + [r for r in DEFAULT_RULES if r[0] != rule[0]]
    cfg = load_config(None, [*BASE, f"mesh.fsdp={sizes[0]}", f"mesh.tensor={sizes[1]}", *extra, rules_override(rules)])
    with pytest.raises(ConfigError) as e:
        build_program(cfg, 8)
    assert "\n" not in str(e.value) and str(e.value).startswith(words), str(e.value)


def test_a_custom_rule_jax_can_run_is_accepted():
    # vocab split over fsdp x tensor on the embedding (a dimension the old check only knew over tensor)
    rules = [["vocab", ["fsdp", "tensor"]]] + [r for r in DEFAULT_RULES if r[0] != "vocab"]
    cfg = load_config(None, [*BASE, "mesh.fsdp=4", "mesh.tensor=2", rules_override(rules)])
    program = build_program(cfg)
    assert program.state_shardings.params["embed_tokens"]["embedding"].spec[0] == ("fsdp", "tensor")
    state, batch = program.abstract_inputs()
    program.train_step.lower(state, batch).compile()


def test_cli_train_refuses_non_dividing_rules_in_one_line(tmp_path):
    rules = [r if r[0] != "kv_heads" else ["kv_heads", "tensor"] for r in KV_WHOLE]
    p = subprocess.run([sys.executable, "-m", "jaxllama.cli", "train", *BASE, "mesh.fsdp=1", "mesh.tensor=8",
                        rules_override(rules), f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "kv_heads=2 over tensor=8" in lines[0], p.stderr


def test_generate_with_replicated_kv_heads_equals_unsharded():
    a = arch_for("model.n_heads=8", "model.n_kv_heads=4", "model.head_dim=16", "model.scan_layers=false")
    params = random_params(a, seed=1)  # unrolled layers, as `generate` runs them
    prompts = [[5, 7, 9], list(range(1, 20)), [3]]
    want = Engine(params, a).generate(prompts, 8, Sampling(temperature=0))
    with pytest.raises(ConfigError, match="kv_heads=4 over tensor=8"):
        inference_program(a, {"data": 1, "fsdp": 1, "tensor": 8})
    program = inference_program(a, {"data": 1, "fsdp": 1, "tensor": 8}, rules=KV_WHOLE)
    assert program.layout.spec(CACHE_AXES[1:])[1] is None  # the KV cache keeps its heads whole too
    placed = place_params(params, a, program.layout)
    assert placed["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec[-1] == "tensor"
    got = Engine(placed, a, program.layout).generate(prompts, 8, Sampling(temperature=0))
    assert [g.tokens for g in got] == [w.tokens for w in want]
    # without --mesh the widest split the rules allow is chosen: all 8 devices with replicated KV heads
    assert inference_program(a, None, rules=KV_WHOLE).plan.shape["tensor"] == 8
    assert inference_program(a, None).plan.shape["tensor"] == 4


class NanAt(SyntheticSource):
    """Synthetic batches, but batch ``bad`` has a NaN loss mask: a non-finite step the train step skips."""

    def __init__(self, *args, bad: int, **kw):
        super().__init__(*args, **kw)
        self.bad_batch = bad

    def __next__(self):
        index = self.position
        out = super().__next__()
        if index == self.bad_batch:
            out = dict(out, loss_mask=np.full_like(out["loss_mask"], np.nan))
        return out


def test_logged_lr_is_the_rate_applied_after_a_skipped_step(tmp_path):
    cfg = load_config(None, [*BASE, "mesh.fsdp=1", "train.steps=6", "optim.warmup_steps=4",
                             f"run_dir={tmp_path}", "data.global_batch=8"])
    summary = train(cfg, source=NanAt(cfg.model.vocab_size, 32, 8, bad=2), devices=jax.devices()[:1],
                    out=lambda _: None)
    rows = summary["history"]
    assert [r["skipped_nonfinite"] for r in rows] == [0, 0, 1, 1, 1, 1]
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    applied = [0, 1, 2, 2, 3, 4]  # updates applied before each step: step 3 was skipped
    np.testing.assert_allclose([r["lr"] for r in rows], [float(schedule(n)) for n in applied], rtol=1e-6)
    assert rows[3]["lr"] != float(schedule(3))  # what the old log (schedule at state.step) printed


def test_parse_size_everywhere():
    assert parse_size("5G", "k") == parse_size("5GiB", "k") == 5 * 2**30
    assert parse_size("5GB", "k") == 5 * 10**9
    with pytest.raises(ConfigError, match="--shard-size"):
        parse_size("5 parsecs", "--shard-size")


def test_a_rule_for_an_axis_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match=r"mesh.rules\[3\]: 'kv_head' is not a logical axis \(did you mean kv_heads\?\)"):
        load_config(None, [rules_override([r if r[0] != "kv_heads" else ["kv_head", None] for r in KV_WHOLE])])


def test_parse_rules_from_a_list_or_a_run_config(tmp_path):
    assert parse_rules("[[kv_heads, null]]") == [["kv_heads", None]]
    (tmp_path / "config.yaml").write_text("mesh:\n  rules: [[kv_heads, null], [heads, tensor]]\n")
    assert parse_rules(str(tmp_path / "config.yaml")) == [["kv_heads", None], ["heads", "tensor"]]
    with pytest.raises(ConfigError, match=r"--rules\[0\]"):
        parse_rules("[[kv_heads, pod]]")


def _package_graph() -> dict[str, set[str]]:
    """Import edges between the package's parts (subpackages and top-level modules), every import
    statement counted, lazy ones inside functions included."""
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for f in PACKAGE.rglob("*.py"):
        mod = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        src = part(mod)
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("jaxllama.") and part(name) != src:
                    graph.setdefault(src, set()).add(part(name))
    return graph


def test_package_import_graph_has_no_cycles():
    graph = _package_graph()
    assert "jaxllama.program" in graph["jaxllama.train"]  # the graph is real: the loop asks the builder
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(node):] + [node])}")
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])
        done.add(node)

    for node in graph:
        visit(node, [])


def test_one_owner_per_concept():
    """The batch keys, the mesh axis names and size parsing are each written in one module."""
    hits = {"batch keys": [], "axis names": [], "size units": []}
    for f in PACKAGE.rglob("*.py"):
        text = f.read_text()
        if '"segment_ids", "positions"' in text or "segment_ids=jnp.int32" in text or '"positions": np.int32' in text:
            hits["batch keys"].append(f.name)
        if '("data", "fsdp", "tensor")' in text:
            hits["axis names"].append(f.name)
        if '"gib": 2**30' in text or '"GIB": 2**30' in text:
            hits["size units"].append(f.name)
    assert hits == {"batch keys": ["batch.py"], "axis names": ["mesh.py"], "size units": ["config.py"]}


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory):
    """An 8-head, 2-KV-head random model as a Hugging Face folder with a SentencePiece tokenizer, and a
    config file whose mesh.rules keep the KV heads whole (what a training run's config.yaml holds)."""
    import io
    import random

    import sentencepiece as spm

    from jaxllama.convert.common import Extras, ParamsSource
    from jaxllama.convert.hf import write_hf
    from jaxllama.model.llama import Arch

    root = tmp_path_factory.mktemp("kv_model")
    words = "the quick brown fox jumps over lazy dog hello world".split()
    rng = random.Random(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(10))
                                                          for _ in range(300)),
                                   model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True,
                                   minloglevel=2)
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.model").write_bytes(buf.getvalue())
    m = load_config(None, [*BASE, "model.vocab_size=320"]).model
    write_hf(ParamsSource(random_params(Arch.from_config(m), seed=3), m,
                          Extras(tokenizer_dir=root / "tok", bos_token_id=1, eos_token_id=2)), root / "hf")
    (root / "ok.yaml").write_text("mesh:\n  data: 1\n  fsdp: 1\n  tensor: 8\n  rules: " + json.dumps(KV_WHOLE) + "\n")
    return root


def test_every_verb_takes_the_replicated_kv_rules(kv_model, capsys):
    from jaxllama.cli import main

    hf, ok = str(kv_model / "hf"), str(kv_model / "ok.yaml")

    def run(*argv):
        capsys.readouterr()
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    gen = ["generate", hf, "--prompt", "the quick brown", "--temperature", "0", "--max-new-tokens", "6", "--json"]
    want = json.loads(run(*gen, "--mesh", "tensor=1"))
    got = json.loads(run(*gen, "--mesh", "tensor=8", "--rules", ok))
    assert got["tokens"] == want["tokens"] and len(got["tokens"]) == 6
    assert main([*gen, "--mesh", "tensor=8"]) == 2  # the default rules split 2 KV heads 8 ways: refused
    assert "kv_heads=2 over tensor=8" in capsys.readouterr().err
    ev = ["eval", hf, "--data", "synthetic", "--seq-len", "32", "--batch", "8", "--max-batches", "2"]
    one = json.loads(run(*ev, "--mesh", "tensor=1").splitlines()[-1])
    eight = json.loads(run(*ev, "--mesh", "tensor=8", "--rules", ok).splitlines()[-1])
    assert eight["mesh"]["tensor"] == 8 and eight["mean_nll"] == pytest.approx(one["mean_nll"], abs=1e-5)
    model = BASE[:5] + ["data.global_batch=8"]  # the debug preset with 8 heads, 2 KV heads; synthetic data
    info = run("info", "--devices", "8", "--device-memory", "16GB", "--config", ok, *model)
    assert "tensor=8" in info and "FITS" in info
    report = run("compile-check", "--devices", "8", "--config", ok, *model)
    assert "train step: compiled" in report and "tensor=8" in report


def test_cudnn_attention_off_a_gpu_is_refused_before_compiling(make_cfg):
    """model.attention=cudnn on CPU devices: one line naming the key, not cuDNN's runtime error."""
    cfg = make_cfg("model.attention=cudnn", "model.dtype=bfloat16")
    with pytest.raises(ConfigError, match=r"model.attention=cudnn needs a GPU .* runs on cpu devices"):
        build_program(cfg)
    build_program(cfg, 8)  # an abstract mesh (compile-check for a target): no platform to refuse
