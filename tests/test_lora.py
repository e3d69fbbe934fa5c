"""LoRA: a zero initial delta, only adapters trained (base untouched, optimizer state for adapters only),
sharded like their kernels, exact resume from adapter-only checkpoints, fine-tuning from a Hugging Face
folder with no preset and no tokenizer given, PEFT export loaded by ``peft`` with equal logits, PEFT
import, ``--merge-lora`` to HF equal to PEFT's own merge, ``generate --lora`` unmerged equal to the merged
model, and the bad inputs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_tokenizers import ENV, hf_dir, reference, tiktoken_path  # noqa: F401 (fixtures)

from helpers import flat_arrays, random_params
from jaxllama.config import load_config
from jaxllama.convert import convert
from jaxllama.convert.adapters import read_adapter
from jaxllama.convert.common import Extras, ParamsSource
from jaxllama.convert.hf import write_hf
from jaxllama.errors import ConfigError
from jaxllama.model.llama import Arch, Llama
from jaxllama.model.lora import merge
from jaxllama.train.init_from import load_train_config
from jaxllama.train.loop import Trainer, train

torch = pytest.importorskip("torch")
CHAT = [[{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
        for i in range(40)]
QUIET = ["train.tensorboard=false", "train.progress=false"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, hf_dir):
    """A random Llama (debug shapes, GQA) as a Hugging Face folder with a Llama-3-style tokenizer and template."""
    d = tmp_path_factory.mktemp("lora")
    m = load_config(None, ["model.preset=debug", "model.vocab_size=1024"]).model
    params = random_params(Arch.from_config(m), seed=5)
    write_hf(ParamsSource(params, m, Extras(tokenizer_dir=hf_dir)), d / "hf")
    (d / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHAT))
    return d, params, m


def lora_cfg(d, *extra):
    return load_train_config(None, [f"train.init_from={d / 'hf'}", f"data.source={d / 'chat.jsonl'}", "data.format=chat",
                              "data.seq_len=32", "data.global_batch=8", "train.lora.rank=4", "train.lora.alpha=8",
                              "optim.lr=1e-2", "optim.warmup_steps=0", *QUIET, *extra])


def test_shapes_and_tokenizer_come_from_the_checkpoint(base):
    d, _, m = base
    cfg = lora_cfg(d)
    for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        assert getattr(cfg.model, k) == getattr(m, k), k
    from jaxllama.data.sources import open_tokenizer

    assert open_tokenizer(cfg, "files").chat_template  # the HF folder's tokenizer and its template


def test_zero_delta_only_adapters_train_and_sharding(base):
    d, params, _ = base
    cfg = lora_cfg(d, "mesh.fsdp=4", "mesh.tensor=2")
    full = Trainer.build(load_train_config(None, [f"train.init_from={d / 'hf'}", "data.source=synthetic", "data.seq_len=32",
                                            "data.global_batch=8", "mesh.fsdp=4", "mesh.tensor=2", *QUIET]), init=False)
    full.initialize(say=lambda _: None)
    t = Trainer.build(cfg, init=False)
    t.initialize(say=lambda _: None)
    # the state: adapters are the params, the base is frozen and equal to the checkpoint
    assert set(flat_arrays(t.state.params)) == {f"layers/{g}/{n}/lora_{x}" for g, n in
                                               [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                                                ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                                                ("mlp", "down_proj")] for x in "ab"}
    for k, v in flat_arrays(params).items():
        np.testing.assert_array_equal(flat_arrays(t.state.frozen)[k], v, err_msg=k)
    opt_shapes = sorted(x.shape for x in jax.tree.leaves(t.state.opt_state) if x.ndim)
    assert opt_shapes == sorted(2 * [x.shape for x in jax.tree.leaves(t.state.params)])
    q = t.state.params["layers"]["self_attn"]["q_proj"]
    kernel_sh = t.state.frozen["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec
    assert q["lora_a"].sharding.spec[:2] == kernel_sh[:2] and q["lora_b"].sharding.spec[2] == kernel_sh[2]
    assert not np.any(np.asarray(q["lora_b"]))  # B = 0: the delta starts at zero
    from jaxllama.data.sources import make_source

    src = make_source(cfg)
    batch = t.global_batch(next(src))
    src.close()
    loss0 = float(t.program.eval_step(t.state.model_tree(), batch)[0])
    assert loss0 == pytest.approx(float(full.program.eval_step(full.state.params, batch)[0]), rel=1e-6)
    frozen_before = flat_arrays(t.state.frozen)
    adapters_before = flat_arrays(t.state.params)
    m = t.step(batch)
    assert float(m["loss"]) == pytest.approx(loss0 / float(m["tokens"]), rel=1e-5)
    for k, v in flat_arrays(t.state.frozen).items():
        np.testing.assert_array_equal(v, frozen_before[k], err_msg=k)
    changed = [k for k, v in flat_arrays(t.state.params).items() if not np.array_equal(v, adapters_before[k])]
    assert len(changed) == len(adapters_before)


def test_resume_is_exact_and_checkpoints_hold_adapters_only(base, tmp_path):
    d, _, _ = base
    extra = ["optim.schedule=constant", "train.log_every=1", "train.lora.dropout=0.1", "train.grad_accum=2", "data.global_batch=16"]
    whole = train(lora_cfg(d, "train.steps=4", f"run_dir={tmp_path / 'a'}", *extra), out=lambda _: None)
    train(lora_cfg(d, "train.steps=2", f"run_dir={tmp_path / 'b'}", *extra), out=lambda _: None)
    resumed = train(lora_cfg(d, "train.steps=4", f"run_dir={tmp_path / 'b'}", *extra), out=lambda _: None)
    assert resumed["resumed_from"] == 2
    assert [r["loss"] for r in whole["history"][2:]] == [r["loss"] for r in resumed["history"]]
    stored = flat_arrays(jax.tree.map(np.asarray, __import__("jaxllama.checkpoint", fromlist=["load_params"])
                                      .load_params(str(tmp_path / "b"))[0]))
    assert stored and all(k.rsplit("/", 1)[1] in ("lora_a", "lora_b") for k in stored)
    a, b = read_adapter(tmp_path / "a"), read_adapter(tmp_path / "b")
    for module in a.tensors:
        np.testing.assert_array_equal(a.tensors[module][1], b.tensors[module][1])


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    d, _, _ = base
    run = tmp_path_factory.mktemp("run") / "run"
    train(lora_cfg(d, "train.steps=6", f"run_dir={run}", "train.lora.targets=[q_proj, v_proj, down_proj]"),
          out=lambda _: None)
    return run


def jax_logits(base_params, m, adapter, tokens):
    a = Arch.from_config(m, adapter.lora_config())
    tree = merge(jax.tree.map(jnp.asarray, base_params), jax.tree.map(jnp.asarray, adapter.tree()))
    return np.asarray(Llama(a).apply({"params": tree}, jnp.asarray(tokens)))


def test_peft_export_loads_in_peft_with_equal_logits(base, tuned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, params, m = base
    convert(str(tuned), str(tmp_path / "peft"), "peft")
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["q_proj", "v_proj", "down_proj"] and conf["r"] == 4
    hf = AutoModelForCausalLM.from_pretrained(str(d / "hf"), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 17))
    with torch.no_grad():
        want = peft_model(torch.tensor(tokens)).logits.numpy()
    adapter = read_adapter(tuned)
    assert np.abs(adapter.tensors["q_proj"][1]).max() > 1e-3  # trained: B moved away from zero
    got = jax_logits(params, m, adapter, tokens)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    base_logits = jax_logits(params, m, type(adapter)(**{**adapter.__dict__, "tensors": {
        k: (a, np.zeros_like(b)) for k, (a, b) in adapter.tensors.items()}}), tokens)
    assert np.abs(base_logits - want).max() > 1e-3  # the adapter changes the output
    # importing the PEFT folder gives back the same adapter
    back = read_adapter(tmp_path / "peft")
    for k, (a, b) in adapter.tensors.items():
        np.testing.assert_array_equal(back.tensors[k][0], a)
        np.testing.assert_array_equal(back.tensors[k][1], b)
    # --merge-lora to HF equals PEFT's own merge_and_unload
    convert(str(tuned), str(tmp_path / "merged"), "hf", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), torch_dtype=torch.float32)
    with torch.no_grad():
        ours = merged(torch.tensor(tokens)).logits.numpy()
        theirs = peft_model.merge_and_unload()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxllama.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_generate_with_lora_unmerged_equals_the_merged_model(base, tuned, tmp_path):
    d, _, _ = base
    convert(str(tuned), str(tmp_path / "merged"), "jaxllama", merge_lora=True)
    convert(str(tuned), str(tmp_path / "peft"), "peft")
    common = ["--prompt", "What is 3 plus 3?", "--chat", "--temperature", "0", "--max-new-tokens", "8", "--json"]
    outs = {}
    for name, args in (("run", [str(tuned)]), ("peft", [str(d / "hf"), "--lora", str(tmp_path / "peft")]),
                       ("merged", [str(tmp_path / "merged")])):
        r = run_cli("generate", *args, *common)
        assert r.returncode == 0, r.stderr
        outs[name] = json.loads(r.stdout.strip().splitlines()[-1])["tokens"]
    assert outs["run"] == outs["peft"] == outs["merged"] and len(outs["run"]) > 0


def test_bad_inputs_are_one_line_errors(base, tuned, tmp_path):
    d, _, _ = base
    with pytest.raises(ConfigError, match="train.lora.targets: 'qproj' matches no linear layer.*did you mean q_proj"):
        lora_cfg(d, "train.lora.targets=[qproj]")
    with pytest.raises(ConfigError, match="is a LoRA adapter: write it with --to peft"):
        convert(str(tuned), str(tmp_path / "x"), "hf")
    with pytest.raises(ConfigError, match="--to peft: .* is not a LoRA adapter"):
        convert(str(d / "hf"), str(tmp_path / "y"), "peft")
    # an adapter for another base: the PEFT folder over a base of other shapes
    convert(str(tuned), str(tmp_path / "peft"), "peft")
    m2 = load_config(None, ["model.preset=debug", "model.vocab_size=1024", "model.dim=32", "model.head_dim=16"]).model
    write_hf(ParamsSource(random_params(Arch.from_config(m2)), m2), tmp_path / "other")
    r = run_cli("generate", str(tmp_path / "other"), "--lora", str(tmp_path / "peft"), "--tokenizer",
                str(d / "hf"), "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 2 and "the q_proj adapter is [64 x 4]" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("mode, group", [("int8", 0), ("int4", 32)])
def test_qlora_base_is_quantized_frozen_and_close(base, mode, group):
    from jaxllama.data.sources import make_source
    from jaxllama.model.quant import QDTYPE, dequantize, unpack

    d, params, _ = base
    extra = [f"train.lora.quantize={mode}"] + ([f"train.lora.group_size={group}"] if group else [])
    plain, qlora = Trainer.build(lora_cfg(d), init=False), Trainer.build(lora_cfg(d, *extra), init=False)
    plain.initialize(say=lambda _: None)
    qlora.initialize(say=lambda _: None)
    node = qlora.state.frozen["layers"]["mlp"]["up_proj"]
    assert set(node) == {"kernel_q", "kernel_scale"} and node["kernel_q"].dtype == QDTYPE[mode]
    scale = np.asarray(node["kernel_scale"])  # [layers, out, groups]
    levels = np.asarray(unpack(node["kernel_q"], mode, scale.shape[-1]))
    assert levels.min() >= (-127 if mode == "int8" else -8) and levels.max() <= (127 if mode == "int8" else 7)
    w = params["layers"]["mlp"]["up_proj"]["kernel"]
    deq = np.asarray(dequantize(node["kernel_q"], node["kernel_scale"], mode))
    assert scale.shape[-1] == (1 if mode == "int8" else w.shape[1] // group)
    per_elem = np.repeat(scale, w.shape[1] // scale.shape[-1], axis=-1).swapaxes(-1, -2)  # [layers, in, out]
    assert np.all(np.abs(deq - w) <= per_elem / 2 + 1e-6)  # round to nearest: at most half a step
    assert "kernel" not in node and qlora.state.frozen["embed_tokens"]["embedding"].dtype == jnp.float32
    src = make_source(lora_cfg(d))
    batch = plain.global_batch(next(src))
    src.close()
    exact = float(plain.program.eval_step(plain.state.model_tree(), batch)[0])
    approx = float(qlora.program.eval_step(qlora.state.model_tree(), batch)[0])
    assert approx == pytest.approx(exact, rel=2e-2 if mode == "int4" else 2e-3) and approx != exact
    before = jax.tree.map(np.asarray, qlora.state.frozen)
    losses = [float(qlora.step(batch)["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0]
    after = jax.tree.map(np.asarray, qlora.state.frozen)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_adapter_gradients_equal_peft(base, tuned):
    """The gradient of the masked mean loss with respect to every adapter matrix equals PEFT's on the
    same weights and batch (A and B both, with B trained away from zero)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxllama.convert import convert as to_peft
    from jaxllama.model.lora import split

    d, params, m = base
    peft_dir = d / "grad-peft"
    if not peft_dir.exists():
        to_peft(str(tuned), str(peft_dir), "peft")
    adapter = read_adapter(tuned)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 1000, (2, 24))
    targets = np.roll(tokens, -1, axis=1)
    mask = (rng.random((2, 24)) < 0.6).astype(np.float32)
    mask[:, -1] = 0
    a = Arch.from_config(m, adapter.lora_config())
    tree = merge(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, adapter.tree()))
    ad, frozen = split(tree)

    def loss(ad):
        logits = Llama(a).apply({"params": merge(frozen, ad)}, jnp.asarray(tokens))
        lp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * mask) / mask.sum()

    ours = jax.grad(loss)(ad)
    hf = AutoModelForCausalLM.from_pretrained(str(d / "hf"), torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(peft_dir), is_trainable=True)
    logits = model(torch.tensor(tokens)).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1),
                                            reduction="none")
    (nll * torch.tensor(mask).reshape(-1)).sum().div(mask.sum()).backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}
    from jaxllama.convert.adapters import MODULES

    for module, path in MODULES.items():
        if module not in adapter.tensors:
            continue
        group, name = path.split("/")
        for i in range(m.n_layers):
            hf_path = f"base_model.model.model.layers.{i}.{group.replace('self_attn', 'self_attn')}.{name}"
            ga = grads[f"{hf_path}.lora_A.default.weight"].T
            gb = grads[f"{hf_path}.lora_B.default.weight"].T
            np.testing.assert_allclose(np.asarray(ours["layers"][group][name]["lora_a"][i]), ga, rtol=2e-3, atol=2e-6)
            np.testing.assert_allclose(np.asarray(ours["layers"][group][name]["lora_b"][i]), gb, rtol=2e-3, atol=2e-6)
            assert np.abs(ga).max() > 0 and np.abs(gb).max() > 0
