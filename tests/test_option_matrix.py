"""Every documented option trains, alone and with each option it interacts with.

The factors below are the options that change the compiled step; every pair of their values appears
together in at least one row (an all-pairs covering array, built greedily and checked), and each row
trains 3 steps through :func:`jaxllama.train.loop.train` -- what ``jaxllama train`` calls -- on the
``debug`` preset with real documents (a SentencePiece tokenizer over text files, so packing and
segment masks are real). The options that do not interact (schedules, AdamW fields, logging,
checkpointing, eval, init_from, shape overrides, rules) ride along, one set per row, each with a
check that it took effect. Where values must agree they are compared: the invariant factors (scan vs
unrolled layers, remat policies, grad_accum, the attention kernels, the mesh) give float32 losses
equal to a reference run's. The last test reads the README's key table and fails when it documents
a key (or a listed value) that no row here exercises.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxllama.checkpoint import save_params
from jaxllama.config import Config, LoraConfig, load_config
from jaxllama.program import build_program
from jaxllama.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
# seq_len 128: the shortest length the splash kernel takes (shorter rows fall back to the reference).
BASE = ["model.preset=debug", "model.vocab_size=512", "data.seq_len=128", "data.global_batch=16",
        f"train.steps={STEPS}", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
        "checkpoint.enabled=false", "optim.warmup_steps=2"]

# Options that change the compiled train step, and so may break one another. The first value of each
# is the reference the comparisons start from.
FACTORS: dict[str, list[str]] = {
    "model.scan_layers": ["true", "false"],
    "model.remat": ["none", "full", "save_dots"],
    "train.grad_accum": ["1", "2"],
    "model.attention": ["xla", "dot_product", "splash"],  # splash: the Pallas kernel, interpreted on CPU
    # one slice, and multi-slice (DCN) meshes splitting each axis across slices
    "mesh": ["fsdp=8", "dcn_data=2,fsdp=2,tensor=2", "data=2,dcn_fsdp=2,dcn_tensor=2"],
    "model.dtype": ["float32", "bfloat16", "float16"],
    "model.param_dtype": ["float32", "bfloat16"],
    "model.tie_embeddings": ["false", "true"],
    "data.packing": ["pack", "concat"],
    "train.lora.rank": ["0", "4"],  # 4: LoRA adapters (LORA_OPTIONS ride along) over a frozen base
}
# The other LoRA fields, set on every row with adapters (they mean nothing without them); QLoRA rides
# along by the row's compute dtype: an int8 base on float32 rows, int4 (groups of 32) on bfloat16 rows.
LORA_OPTIONS = ["train.lora.alpha=8", "train.lora.dropout=0.1", "train.lora.targets=[q_proj, v_proj, down_proj]"]
QLORA_BY_DTYPE = {"float32": ["train.lora.quantize=int8"],
                  "bfloat16": ["train.lora.quantize=int4", "train.lora.group_size=32"], "float16": []}
# Factors that must not change a float32 loss (beyond float error): runs differing only in these agree.
INVARIANT = ("model.scan_layers", "model.remat", "train.grad_accum", "model.attention", "mesh")
REFERENCE = {k: v[0] for k, v in FACTORS.items()}
# Float32 runs that differ from the reference in several invariant factors at once (a bug in any one
# of them shows as a mismatch): scan vs unrolled, each remat policy, grad_accum, each kernel, each mesh.
AGREE = [
    REFERENCE,
    {**REFERENCE, "model.scan_layers": "false", "model.remat": "save_dots", "train.grad_accum": "2",
     "model.attention": "dot_product", "mesh": "dcn_data=2,fsdp=2,tensor=2"},
    {**REFERENCE, "model.scan_layers": "false", "model.remat": "full", "model.attention": "splash",
     "mesh": "data=2,dcn_fsdp=2,dcn_tensor=2"},
]


def all_pairs(factors: dict[str, list[str]], seed_rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """``seed_rows`` plus rows until every pair of values of two factors appears in some row. Greedy
    and deterministic: each candidate row starts from one uncovered pair and takes, factor by factor,
    the value covering most uncovered pairs; the candidate covering most is kept."""
    names = list(factors)

    def pairs(row):
        return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}

    def grow(start):
        row = dict(start)
        for name in names:
            if name not in row:
                row[name] = max(factors[name], key=lambda v: len(pairs_with(row, name, v) & todo))
        return {n: row[n] for n in names}

    def pairs_with(row, name, v):
        return {tuple(sorted(((n, row[n]), (name, v)), key=lambda p: names.index(p[0]))) for n in row}

    todo = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2) for x in factors[a] for y in factors[b]}
    rows = [dict(r) for r in seed_rows]
    for r in rows:
        todo -= pairs(r)
    while todo:
        best = max((grow(dict(pair)) for pair in sorted(todo)), key=lambda r: len(pairs(r) & todo))
        rows.append(best)
        todo -= pairs(best)
    return rows


ROWS = all_pairs(FACTORS, AGREE)


def overrides(row: dict[str, str]) -> list[str]:
    out = []
    for key, value in row.items():
        if key == "mesh":
            sizes = dict(kv.split("=") for kv in value.split(","))
            sizes.setdefault("fsdp", "-1")
            out += [f"mesh.{k}={v}" for k, v in sizes.items()]
        elif key == "train.lora.rank" and value != "0":
            out += [f"{key}={value}", *LORA_OPTIONS, *QLORA_BY_DTYPE[row["model.dtype"]]]
        else:
            out.append(f"{key}={value}")
    return out


# ---------------------------------------------------------------------------------------------
# The options that do not interact with the factors: one set rides on each row, with its check.


def _init_from(cfg: Config, tmp: Path) -> list[str]:
    """Weights to start from, of this row's shape (another seed's, written as a jaxllama params dir; a
    LoRA row's base)."""
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora=LoraConfig()))  # float weights
    save_params(str(tmp / "init"), build_program(plain).init_state(seed=5).params, cfg.model)
    return [f"train.init_from={tmp / 'init'}"]


def _check_init_from(run: Path, lines: list[str], history: list[dict]) -> None:
    assert any("init" in line and str(run.parent / "init") in line for line in lines), lines


def _check_tensorboard(run: Path, lines, history) -> None:
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def _check_eval(run: Path, lines, history) -> None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and all(np.isfinite(r["eval_loss"]) for r in evals), rows


def _check_checkpoints(run: Path, lines, history) -> None:
    kept = sorted(int(p.name) for p in (run.parent / "ckpt").iterdir() if p.name.isdigit())
    assert kept == [2, 3], kept  # keep=1 keeps the newest (3); keep_every=2 also keeps 2; 1 is deleted


def _check_log_every(run: Path, lines, history) -> None:
    assert [h["step"] for h in history] == [2, 3]  # log_every=2, and the last step is always logged


def _check_shape(run: Path, lines, history) -> None:
    saved = (run / "config.yaml").read_text()
    assert "n_layers: 3" in saved and "n_heads: 8" in saved


EXTRAS: list[tuple[list[str], object]] = [
    (["optim.schedule=wsd", "optim.decay_fraction=0.5", "optim.min_lr_ratio=0.0"], None),
    (["optim.schedule=constant", "optim.lr=1e-3"], None),
    (["data.seq_len=256", "data.global_batch=8"], None),
    (["optim.schedule=cosine", "optim.min_lr_ratio=0.5", "optim.warmup_steps=1"], None),
    (["optim.b1=0.8", "optim.b2=0.99", "optim.eps=1e-6", "optim.weight_decay=0.0", "optim.clip_norm=0"], None),
    (["train.z_loss=1e-4", "train.loss_chunk=32"], None),
    (["train.log_every=2", "train.seed=3", "train.max_nonfinite=1", "train.peak_flops=2e11"], _check_log_every),
    (["train.tensorboard=true"], _check_tensorboard),
    (["data.eval_fraction=0.2", "train.eval_every=2", "train.eval_batches=1"], _check_eval),
    (["checkpoint.enabled=true", "checkpoint.every=1", "checkpoint.keep=1", "checkpoint.keep_every=2",
      "checkpoint.async_save=false", "checkpoint.dir={tmp}/ckpt"], _check_checkpoints),
    (["model.rope_type=llama3", "model.rope_theta=500000", "model.rope_factor=8", "model.rope_low_freq_factor=1",
      "model.rope_high_freq_factor=4", "model.rope_original_max_position=64", "model.max_position=512",
      "model.norm_eps=1e-6"], None),
    (["model.n_layers=3", "model.dim=64", "model.n_heads=8", "model.n_kv_heads=4", "model.head_dim=16",
      "model.ffn_dim=128", "model.vocab_size=640"], _check_shape),
    ([_init_from], _check_init_from),
    ([("mesh.rules=[[batch, [data, fsdp]], [embed, fsdp], [heads, tensor], [kv_heads, null], [mlp, tensor], "
       "[vocab, tensor]]")], None),
]


def extras_for(i: int) -> list[tuple[list, object]]:
    """The extras row ``i`` carries: none on the comparison runs (they change the losses), round-robin
    over the others."""
    if i < len(AGREE):
        return []
    return EXTRAS[i - len(AGREE)::len(ROWS) - len(AGREE)]


# ---------------------------------------------------------------------------------------------

WORDS = ("the model reads tokens and every layer mixes them with attention then a gated mlp writes "
         "back into the residual stream while the optimizer moves each weight a little").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """200 text documents of 5..120 words and a 320-piece SentencePiece tokenizer trained on them."""
    from jaxllama.data.tokenizers import train_sentencepiece

    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 120)))) + f" doc {i}." for i in range(200)]
    for i, t in enumerate(texts):
        (root / f"{i:03d}.txt").write_text(t)
    train_sentencepiece(texts, vocab_size=320, output=str(root / "sp.model"))
    return [f"data.source={root}/*.txt", f"data.tokenizer={root / 'sp.model'}"]


def resolve(corpus: list[str], row: dict, extra: list[str], tmp: Path) -> list[str]:
    return [*BASE, *corpus, *overrides(row), *extra, f"run_dir={tmp / 'run'}"]


def run_row(corpus: list[str], row: dict, extras: list, tmp: Path) -> tuple[list[str], list[dict]]:
    """Train ``row`` with ``extras``; return its output lines and logged history (every loss finite)."""
    extra = []
    for opts, _ in extras:
        for o in opts:
            if callable(o):
                extra += o(load_config(None, resolve(corpus, row, extra, tmp)), tmp)
            else:
                extra.append(o.format(tmp=tmp))
    cfg = load_config(None, resolve(corpus, row, extra, tmp))
    lines: list[str] = []
    summary = train(cfg, out=lines.append)
    history = summary["history"]
    assert history and history[-1]["step"] == STEPS, lines
    assert all(np.isfinite(h["loss"]) for h in history) and history[-1]["skipped_nonfinite"] == 0, history
    assert history[0]["loss"] < np.log(cfg.model.vocab_size) + 1.0  # a sane start, near uniform or better
    for _, check in extras:
        if check is not None:
            check(tmp / "run", lines, history)
    return lines, history


def _row_id(i: int) -> str:
    row = ROWS[i]
    return "-".join(f"{k.split('.')[-1]}={v}" for k, v in row.items() if v != REFERENCE[k]) or "reference"


@pytest.mark.parametrize("i", range(len(AGREE), len(ROWS)), ids=_row_id)
def test_option_row_trains(i, corpus, tmp_path):
    run_row(corpus, ROWS[i], extras_for(i), tmp_path)


def test_invariant_options_give_the_same_float32_losses(corpus, tmp_path):
    """Scan vs unrolled, remat none/full/save_dots, grad_accum 1/2, xla/dot_product/splash and four
    meshes: the same data and seed give the same losses at every step (float32, reduction order only)."""
    runs = []
    for j, row in enumerate(AGREE):
        _, history = run_row(corpus, row, extras_for(j), tmp_path / str(j))
        runs.append([h["loss"] for h in history])
    for row, losses in zip(AGREE[1:], runs[1:]):
        changed = {k: v for k, v in row.items() if v != REFERENCE[k]}
        np.testing.assert_allclose(losses, runs[0], rtol=2e-5, err_msg=f"losses differ with {changed}")
    assert runs[0][-1] < runs[0][0]  # and they trained: the loss moved


def test_rows_cover_every_pair_of_factor_values():
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            assert any(r[a] == x and r[b] == y for r in ROWS), (a, x, b, y)
    assert len(ROWS) <= 13  # small enough for CI
    for row in AGREE:  # the comparison runs are float32 and differ from the reference only where they must agree
        assert {k for k, v in row.items() if v != REFERENCE[k]} <= set(INVARIANT)
        assert row["model.dtype"] == row["model.param_dtype"] == "float32"


# ---------------------------------------------------------------------------------------------
# The README's key table documents nothing this matrix does not exercise.


def _key_table() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("| key | default | meaning |")
    return list(itertools.takewhile(lambda line: line.startswith("|"), text[start:].splitlines()))[2:]


def _fields() -> dict[str, dict[str, object]]:
    """Every config key and its default, ``{"model": {"dtype": "auto", ...}, "": {"run_dir": None}}``."""
    cfg = Config()
    out: dict[str, dict[str, object]] = {"": {"run_dir": None}}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
            for g in dataclasses.fields(value):  # a nested section: train.lora
                sub = getattr(value, g.name)
                if dataclasses.is_dataclass(sub):
                    out[f"{f.name}.{g.name}"] = {h.name: getattr(sub, h.name) for h in dataclasses.fields(sub)}
    return out


def documented() -> tuple[set[str], dict[str, set[str]]]:
    """(keys the key table names, {key: the values its row lists in backticks})."""
    fields = _fields()
    keys: set[str] = set()
    values: dict[str, set[str]] = {}
    for line in _key_table():
        cells = [c.strip() for c in line.strip("|").split("|")]
        tokens = [t for span in re.findall(r"`([^`]+)`", line) for t in span.split()]
        sections = {t.split(".")[0] for t in re.findall(r"`([^`]+)`", cells[0]) for t in t.split() if "." in t}
        found = set()
        for t in tokens:
            section, _, name = t.rpartition(".")
            if name.endswith("*") and section in fields:  # mesh.dcn_*
                found |= {f"{section}.{n}" for n in fields[section] if n.startswith(name[:-1])}
            elif name in fields.get(section, {}):
                found.add(t)
            for s in sections:  # a bare field name lists another key of the row's section
                if not section and t in fields[s]:
                    found.add(f"{s}.{t}")
        for k in found:
            listed = {t.strip(",") for span in re.findall(r"`([^`]+)`", " ".join(cells[2:])) for t in span.split()}
            values[k] = listed
        keys |= found
    return keys, values


# Listed values no CPU run can exercise, and where they are checked instead.
NOT_ON_CPU = {
    ("model.attention", "cudnn"): "cuDNN needs a GPU; on CPU the program refuses it in one line (test_config)",
    # Runs on CPU, but is not a pairwise factor here (it took the rows past CI's budget of 13); every
    # test that trains with the default (auto) attention on CPU trains with it, and on its own:
    ("model.attention", "cpu_flash"): "the native CPU kernel: its gradients on a data x fsdp x tensor mesh "
                                      "equal the reference's (test_cpu_flash), and auto trains with it",
    ("model.dtype", "auto"): "the default; every row that does not set model.dtype runs it",
}


def test_readme_key_table_documents_nothing_unexercised(corpus, tmp_path):
    keys, values = documented()
    assert {"model.scan_layers", "model.remat", "optim.decay_fraction", "train.grad_accum", "mesh.dcn_data",
            "checkpoint.keep_every", "train.init_from"} <= keys  # the parser reads the table
    fields = _fields()
    seen: dict[str, set[str]] = {}
    for i, row in enumerate(ROWS):
        extra = [o for opts, _ in extras_for(i) for o in opts if not callable(o)]
        if any(callable(o) for opts, _ in extras_for(i) for o in opts):
            extra.append("train.init_from=weights")
        for o in resolve(corpus, row, extra, tmp_path):
            k, _, v = o.partition("=")
            seen.setdefault(k, set()).add(v)
    missing = []
    for k in sorted(keys):
        section, _, name = k.rpartition(".")
        default = fields[section][name]
        set_to = seen.get(k, set())
        if not set_to or set_to == {str(default).lower()}:
            missing.append(f"{k}: never set to a non-default value")
            continue
        choices = {v for v in values.get(k, ()) if _is_value_of(k, v)}
        if isinstance(default, bool):
            choices |= {"true", "false"}
        for v in sorted(choices - set_to - {str(default).lower()}):
            if (k, v) not in NOT_ON_CPU:
                missing.append(f"{k}={v}: listed in the README, never exercised")
    assert not missing, "\n".join(missing)


def _is_value_of(key: str, value: str) -> bool:
    """Whether ``value`` is a valid setting of ``key`` (so a row's other backticked words are ignored)."""
    from jaxllama.config import ATTENTION_IMPLS, DTYPES, PACKING_MODES, REMAT_POLICIES, SCHEDULES

    choices = {"model.attention": ATTENTION_IMPLS, "model.dtype": ("auto",) + DTYPES, "model.param_dtype": DTYPES,
               "model.remat": REMAT_POLICIES, "optim.schedule": SCHEDULES, "data.packing": PACKING_MODES}
    return value in choices.get(key, ())
