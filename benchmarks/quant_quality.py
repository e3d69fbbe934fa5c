"""Quantization quality (issue 16): perplexity of a trained model, jaxllama int8/int4 vs llama.cpp's quantizations.

One run does everything, on the same weights and the same token ids for both engines:

1. **Trains** the test fixture's model (``tests/trained_model.py``: ``tiny`` preset with ``ffn_dim``
   768, 4.2M parameters, stdlib corpus, 64-token rows, batch 8, lr 3e-3 cosine) for ``--steps``
   steps (default 400, 4x the fixture's), cached under ``--work`` (a rerun skips training).
2. **Held-out text**: the stdlib files the training run never read. The checkpoint's data state
   says how many documents of the (shuffled, deterministic) epoch-0 document stream the run took;
   replaying that stream prefix with the pipeline's own ``documents()`` names every file it could
   have trained on. From the other files, a fixed random sample (seed 0) of about ``--eval-tokens``
   tokens is copied to ``WORK/heldout/*.txt`` (one document per file, as in the corpus).
3. **jaxllama** perplexity with the library's ``jaxllama.infer.evaluate.evaluate`` (what ``jaxllama
   eval RUN --data 'WORK/heldout/*.txt' --seq-len 64 [--quantize ...]`` runs): float32, int8 (one
   scale per output channel), int4 with groups of 128, 64 and 32. Weight-only: block projections,
   embedding and LM head.
4. **llama.cpp** (llama-cpp-python) perplexity on the same rows: the eval source jaxllama's evaluate
   reads (``make_source(eval_config(...), split="eval")``) is rebuilt and each packed segment of
   each row (a document or a 64-token piece of one; positions restart at 0 in each, attention never
   crosses them) is run through llama.cpp as its own sequence from position 0, scoring the same
   targets under the same loss mask. So both engines sum the NLL of exactly the same (context,
   target) pairs; the token counts are checked equal. Files: our ``--gguf-type f32`` export,
   llama.cpp's ``llama_model_quantize`` of that file to Q8_0, Q4_0 and Q4_K_M, and our own
   ``--gguf-type q8_0 / q4_0 / q4_k_m`` exports. llama.cpp runs on plain CPU buffers
   (``use_extra_bufts`` off: its AMX repacking crashes on this model's shapes, see
   ``tests/test_convert_llamacpp.py``), f32 KV cache, ``--threads`` 1 (on a shared 2-core machine
   its spinning worker threads slow it down several-fold).
5. **KL divergence and top-1 agreement**: a perplexity difference on a model this small is ~0.1% and
   can have either sign, so each quantized row also gives the mean KL(f32 || quantized) of the
   next-token distributions over the scored positions (positive; far less noisy) and how often its
   argmax equals f32's, against its own engine's f32. jaxllama's side is the forward ``evaluate``
   builds (``inference_arch``, ``place_params``, ``quantize_for_inference``), jitted over the same
   batches; its NLL is checked equal to ``evaluate``'s (1e-5).
6. Two **cross-checks** and two **diagnosis** rows: jaxllama's ``evaluate`` on llama.cpp's own Q8_0 and
   Q4_0 files (loaded as int8/int4 groups of 32 block for block: the same quantized weights in both
   engines), and int4 with the block projections only quantized (embedding and LM head float:
   QLoRA's layout, not a CLI option), which shows how much of int4's error is the LM head
   (llama.cpp's Q4_0 and Q4_K_M keep ``output.weight`` at Q6_K).

The f32 GGUF in llama.cpp must match jaxllama's float32 perplexity within ``--f32-tol`` (0.1%): the
same weights in two engines, which validates the comparison. Each quantized row's delta is against
its own engine's f32. Goals (issue 16): int8 <= +0.5%, int4 group 128 <= +5%, and each no worse
than llama.cpp's Q8_0 / Q4_0 delta respectively (read both as perplexity and as KL).

    python benchmarks/quant_quality.py --work /tmp/quant_quality --json qq.json   # --steps 400 --eval-tokens 60000
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

OURS = [("float32", None, None), ("int8 (per channel)", "int8", None), ("int4 group 128", "int4", 128),
        ("int4 group 64", "int4", 64), ("int4 group 32", "int4", 32)]
LLAMA_QUANTS = ["Q8_0", "Q4_0", "Q4_K_M"]  # llama_model_quantize of our f32 export
OUR_GGUF = ["q8_0", "q4_0", "q4_k_m"]  # jaxllama convert --to gguf --gguf-type ...
# not a CLI option: int4 on the block projections only (embedding and LM head float), to show where the
# int4 error comes from (llama.cpp's Q4_0 / Q4_K_M keep the LM head at Q6_K)
DIAGNOSIS = [("int4 group 128, embedding + LM head f32", "int4", 128),
             ("int4 group 32, embedding + LM head f32", "int4", 32)]
ON_THEIRS = ["Q8_0", "Q4_0"]  # llama.cpp's files that jaxllama runs block for block (int8/32, int4/32)
F32 = 0  # GGML_TYPE_F32 (llama.cpp's KV cache; its default f16 would blur the comparison)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- 1. training -------------------------------------------------------------------------------

def train_config(steps: int, run: Path):
    from trained_model import OVERRIDES

    from jaxllama.config import load_config

    overrides = [f"train.steps={steps}" if o.startswith("train.steps=") else o for o in OVERRIDES]
    assert f"train.steps={steps}" in overrides
    return load_config(None, [*overrides, f"run_dir={run}"])


def train_model(work: Path, steps: int) -> tuple[Path, dict]:
    """The fixture's training run with ``steps`` steps, in ``work/run-STEPS`` (reused when finished)."""
    import jax

    from jaxllama.train.loop import train

    run = work / f"run-{steps}"
    info_path = work / f"train-{steps}.json"
    if (run / "checkpoints" / str(steps)).is_dir() and info_path.exists():
        say(f"training: reusing {run}")
        return run, json.loads(info_path.read_text())
    start = time.perf_counter()
    summary = train(train_config(steps, run), devices=jax.devices()[:1], out=say)
    assert summary["steps"] == steps, summary
    info = dict(steps=steps, first_loss=summary["first_loss"], final_loss=summary["final_loss"],
                seconds=round(time.perf_counter() - start, 1), tokens_per_s=summary["tokens_per_s"],
                losses=[(r["step"], r["loss"]) for r in summary["history"]])
    info_path.write_text(json.dumps(info, indent=1))
    return run, info


# -- 2. held-out text --------------------------------------------------------------------------

def docs_taken(run: Path, steps: int) -> int:
    """Documents of epoch 0 the run's input pipeline had taken when the last batch was handed out."""
    found = [p for p in (run / "checkpoints" / str(steps)).rglob("*") if p.is_file() and "data" in p.parts]
    for p in found:
        try:
            state = json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(state, dict) and state.get("kind") == "text":
            assert state["epoch"] == 0, state  # still in the first pass over the corpus
            return int(state["docs"])
    raise RuntimeError(f"no data state under {run}/checkpoints/{steps}: {found}")


def heldout_files(run: Path, steps: int, eval_tokens: int, out_dir: Path) -> dict:
    """Copy a seeded sample of the stdlib files the run never read into ``out_dir`` (about ``eval_tokens`` tokens)."""
    from jaxllama.data.corpus import read_documents, stdlib_files
    from jaxllama.data.documents import documents
    from jaxllama.data.sources import parse_source
    from jaxllama.data.tokenizers import load_tokenizer

    cfg = train_config(steps, run)
    d = cfg.data
    taken = docs_taken(run, steps)
    text_of = {}
    for f in stdlib_files():
        for text in read_documents(f, "text", lenient=True):  # what the corpus reader yields (bad bytes replaced)
            text_of.setdefault(text, []).append(f)
    ds = documents(parse_source(d.source), d, epoch=0, seed=cfg.train.seed, shuffle=d.shuffle, process_index=0,
                   process_count=1, split=d.split)
    tok = load_tokenizer(str(run / "tokenizer" / "tokenizer.model"))
    seen, seen_tokens = set(), 0
    for raw in ds.take(taken).as_numpy_iterator():
        text = raw.decode("utf-8")
        seen.update(text_of[text])  # identical files: all of them count as seen
        seen_tokens += len(tok.encode(text))
    # the documents taken hold at least the tokens trained on (rows are mostly full: little padding)
    trained_slots = steps * d.global_batch * d.seq_len
    assert trained_slots * 0.5 <= seen_tokens, (seen_tokens, trained_slots)
    unseen = sorted(set().union(*text_of.values()) - seen)
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.txt"):
        old.unlink()
    picked, total = [], 0
    stdlib_root = Path(stdlib_files()[0]).parent
    for i in rng.permutation(len(unseen)):
        f = unseen[i]
        text = next(read_documents(f, "text", lenient=True))
        n = len(tok.encode(text))
        if n > 4 * 64 * 8 or n < 16:  # no single file dominates; skip near-empty ones
            continue
        rel = str(Path(f).relative_to(stdlib_root))
        (out_dir / f"{len(picked):03d}-{rel.replace('/', '_')}.txt").write_text(text, encoding="utf-8")
        picked.append(rel)
        total += n
        if total >= eval_tokens:
            break
    return dict(docs_taken=taken, files_seen=len(seen), seen_tokens=seen_tokens, trained_token_slots=trained_slots,
                files_unseen=len(unseen), files=picked, tokens=total)


# -- 3. jaxllama -------------------------------------------------------------------------------

def jaxllama_ppl(run: Path, data: str, mode: str | None, group: int | None) -> dict:
    from jaxllama.infer.evaluate import evaluate

    r = evaluate(str(run), data, seq_len=64, batch=8, dtype="float32", quantize=mode, group_size=group)
    return dict(perplexity=r["perplexity"], nll_sum=r["mean_nll"] * r["tokens"], tokens=r["tokens"],
                seconds=r["seconds"])


def evaluate_file(path: Path, data: str, tokenizer: str) -> dict:
    """jaxllama's evaluate on a (quantized) GGUF file, with the run's tokenizer: the same rows."""
    from jaxllama.infer.evaluate import evaluate

    r = evaluate(str(path), data, tokenizer=tokenizer, seq_len=64, batch=8, dtype="float32")
    return dict(perplexity=r["perplexity"], nll_sum=r["mean_nll"] * r["tokens"], tokens=r["tokens"],
                quantize=r["quantize"], group_size=r.get("group_size"))


def eval_batches(run: Path, data: str) -> list[dict]:
    """Every batch (8 rows of 64) of the eval source jaxllama's evaluate reads for ``data``."""
    from jaxllama.convert import load_model
    from jaxllama.data.sources import make_source
    from jaxllama.infer.evaluate import eval_config

    loaded = load_model(str(run))
    src = make_source(eval_config(loaded.model_cfg, data, loaded.tokenizer_path, 64, 8, ()), split="eval")
    try:
        return [dict(b) for b in src]
    finally:
        src.close()


def segments(b: dict):
    """(row, positions in the row) of each packed segment: a document or a piece of one, from position 0."""
    for r in range(b["tokens"].shape[0]):
        seg = b["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all() and (b["positions"][r, idx] == np.arange(idx.size)).all()
            yield r, idx


def jaxllama_forwards(run: Path, data: str, files: dict[str, Path]) -> dict:
    """name -> jitted log-softmax forward [rows, 64, vocab]: the float32 model and each ``OURS``
    quantization, built as ``evaluate`` builds them (``inference_arch``, ``place_params``,
    ``quantize_for_inference``); the ``DIAGNOSIS`` variants (block projections quantized, embedding and
    LM head float: QLoRA's layout, ``quant_embed`` off); and each of ``files`` (quantized GGUF files) as
    ``evaluate`` loads them (``keep_quantized``: Q8_0/Q4_0 blocks as int8/int4 groups of 32, exactly)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxllama.convert import load_model
    from jaxllama.infer.evaluate import eval_config
    from jaxllama.infer.placement import (inference_arch, inference_program, place_params, quantize_for_inference,
                                          quantized_arch, stored_quantization)
    from jaxllama.model import quant
    from jaxllama.model.llama import Arch, Llama, model_params

    loaded = load_model(str(run))
    cfg = eval_config(loaded.model_cfg, data, loaded.tokenizer_path, 64, 8, ())
    arch = inference_arch(Arch.from_config(cfg.model), "float32")
    program = inference_program(arch, None, None, None, data=cfg.data)
    params = place_params(loaded.params, arch, program.layout, program.params_shardings)
    out = {}

    def add(name, p, a):
        def fwd(p, b):
            logits = Llama(a).apply({"params": model_params(p, a)}, b["tokens"], b["positions"], b["segment_ids"])
            return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

        f = jax.jit(fwd)
        out[name] = lambda b: np.asarray(f(p, {k: b[k] for k in ("tokens", "positions", "segment_ids")}))

    for name, mode, group in OURS:
        add(name, *((params, arch) if mode is None else
                    quantize_for_inference(params, arch, program.layout, mode, group)))
    for name, mode, group in DIAGNOSIS:
        a = dataclasses.replace(quantized_arch(arch, mode, group), quant_embed=False)
        add(name, jax.jit(lambda t, mode=mode, group=group: quant.quantize_tree(t, mode, group))(params), a)
    for name, path in files.items():
        lf = load_model(str(path), keep_quantized=True)
        a, _ = stored_quantization(arch, lf.params, str(path), None, None)
        add(name, jax.tree.map(jnp.asarray, lf.params), a)
    return out


# -- 4. llama.cpp ------------------------------------------------------------------------------

def llama_cpp_model(path: Path, threads: int, n_ctx: int = 64):
    """llama.cpp on plain CPU buffers (``use_extra_bufts`` off: the AMX repack path segfaults on this
    model's shapes; see tests/test_convert_llamacpp.py), every position's logits, f32 KV cache."""
    import llama_cpp

    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                               n_threads=threads, type_k=F32, type_v=F32)
    finally:
        low.llama_model_default_params = default


def llama_cpp_forward(llm):
    """batch -> log-softmax [rows, 64, vocab] from llama.cpp: each segment its own sequence from position 0."""
    def run(b):
        t = b["tokens"]
        out = np.zeros((*t.shape, llm.n_vocab()), np.float64)
        for r, idx in segments(b):
            llm.reset()
            llm.eval(t[r, idx].tolist())
            s = np.array(llm.scores[:idx.size], np.float64)
            m = s.max(1, keepdims=True)
            out[r, idx] = s - (m + np.log(np.exp(s - m).sum(1, keepdims=True)))
        return out
    return run


TEMPERATURES = (0.95, 0.98, 1.0, 1.01, 1.02, 1.05, 1.1)


def score(batches, forwards: dict, reference: str, temperatures: tuple = ()) -> dict:
    """Per forward: summed NLL of the targets under the loss mask, tokens, mean entropy, and against
    ``reference``'s next-token distributions the summed KL(reference || it) and top-1 agreement.
    ``temperatures``: also the reference's perplexity with its log-probs divided by each T (renormalized),
    under ``acc[reference]["calibration"]``: where T > 1 scores better the model is over-confident on this
    text, and any change that flattens its distributions lowers perplexity without being closer to it."""
    acc = {k: dict(nll_sum=0.0, tokens=0, kl_sum=0.0, top1_same=0, ent_sum=0.0, seconds=0.0) for k in forwards}
    t_nll = dict.fromkeys(temperatures, 0.0)
    for b in batches:
        mask = b["loss_mask"] > 0
        if not mask.any():
            continue
        tgt = b["targets"][mask]
        logp = {}
        for k, f in forwards.items():
            t = time.perf_counter()
            logp[k] = np.asarray(f(b), np.float64)[mask]
            acc[k]["seconds"] += time.perf_counter() - t
        ref = logp[reference]
        for temp in temperatures:
            z = ref / temp
            m = z.max(1, keepdims=True)
            log_norm = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
            t_nll[temp] -= float((z[np.arange(tgt.size), tgt] - log_norm).sum())
        for k, lp in logp.items():
            a = acc[k]
            a["nll_sum"] -= float(lp[np.arange(tgt.size), tgt].sum())
            a["tokens"] += int(tgt.size)
            a["kl_sum"] += float((np.exp(ref) * (ref - lp)).sum())
            a["top1_same"] += int((lp.argmax(1) == ref.argmax(1)).sum())
            a["ent_sum"] -= float((np.exp(lp) * lp).sum())
    for a in acc.values():
        a.update(perplexity=float(np.exp(a["nll_sum"] / a["tokens"])), kl=a["kl_sum"] / a["tokens"],
                 top1=a["top1_same"] / a["tokens"], entropy=a["ent_sum"] / a["tokens"])
    acc[reference]["calibration"] = {t: float(np.exp(v / acc[reference]["tokens"])) for t, v in t_nll.items()}
    return acc


def llama_quantize(src: Path, dst: Path, name: str) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    p.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama_model_quantize {name} failed")


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors: names, types and bytes."""
    import gguf

    ta, tb = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (a, b))
    return ta.keys() == tb.keys() and all(
        ta[k].tensor_type == tb[k].tensor_type and np.array_equal(np.asarray(ta[k].data), np.asarray(tb[k].data))
        for k in ta)


def tensor_types(path: Path) -> dict:
    import gguf

    t = {x.name: x.tensor_type.name for x in gguf.GGUFReader(path).tensors}
    return dict(token_embd=t["token_embd.weight"], output=t.get("output.weight", "tied"),
                blocks=sorted({v for k, v in t.items() if k.startswith("blk.") and not k.endswith("norm.weight")}))


# -- report ------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    lines = ["| engine | weights | perplexity | Δ ppl vs own f32 | mean KL vs own f32 | top-1 = f32 | "
             "GGUF types (embd / output / blocks) | file MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "—" if r["delta"] is None else f"{100 * r['delta']:+.3f}%"
        kl = "—" if r.get("kl") is None else f"{r['kl']:.2e}"
        top1 = "—" if r.get("top1") is None else f"{100 * r['top1']:.2f}%"
        t = r.get("types")
        types = "" if t is None else f"{t['token_embd']} / {t['output']} / {', '.join(t['blocks'])}"
        size = "" if r.get("mib") is None else f"{r['mib']:.2f}"
        lines.append(f"| {r['engine']} | {r['format']} | {r['perplexity']:.4f} | {delta} | {kl} | {top1} | "
                     f"{types} | {size} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/quant_quality", help="run dir, held-out text and GGUF files (cached)")
    ap.add_argument("--steps", type=int, default=400, help="training steps (the test fixture's: 100)")
    ap.add_argument("--eval-tokens", type=int, default=60000, help="held-out tokens, about")
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (1: its spinning threads slow down badly on a shared 2-core machine)")
    ap.add_argument("--f32-tol", type=float, default=1e-3, help="|llama.cpp f32 / jaxllama f32 - 1| allowed")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    run, info = train_model(work, args.steps)
    say(f"trained: {args.steps} steps, loss {info['first_loss']:.4f} -> {info['final_loss']:.4f}")
    held = heldout_files(run, args.steps, args.eval_tokens, work / "heldout")
    data = str(work / "heldout" / "*.txt")
    say(f"held out: {len(held['files'])} files (~{held['tokens']:,} tokens) of the {held['files_unseen']} the run "
        f"never read (it took {held['docs_taken']} documents: {held['files_seen']} files)")

    # jaxllama: the library's evaluate (= jaxllama eval RUN --data ... --seq-len 64 [--quantize])
    ours = {}
    for name, mode, group in OURS:
        ours[name] = jaxllama_ppl(run, data, mode, group)
        say(f"jaxllama {name}: ppl {ours[name]['perplexity']:.4f} ({ours[name]['tokens']:,} tokens, "
            f"{ours[name]['seconds']:.1f}s)")
    n_targets = ours["float32"]["tokens"]

    from jaxllama.convert import convert

    gdir = work / "gguf"
    gdir.mkdir(exist_ok=True)
    for old in gdir.glob("*.gguf"):  # written afresh: they are the code under test
        old.unlink()
    files = {"f32 (our export)": gdir / "f32.gguf"}
    convert(str(run), str(files["f32 (our export)"]), "gguf", gguf_type="f32")
    for q in LLAMA_QUANTS:
        files[f"{q} (llama.cpp's quantizer)"] = gdir / f"llama-cpp-{q}.gguf"
        llama_quantize(files["f32 (our export)"], files[f"{q} (llama.cpp's quantizer)"], q)
    for q in OUR_GGUF:
        files[f"{q.upper()} (our export)"] = gdir / f"ours-{q}.gguf"
        convert(str(run), str(files[f"{q.upper()} (our export)"]), "gguf", gguf_type=q)

    # llama.cpp's own Q8_0 / Q4_0 files run by jaxllama's evaluate (the run's tokenizer: the same rows)
    tok = str(run / "tokenizer" / "tokenizer.model")
    theirs_files = {f"llama.cpp's {q} file": files[f"{q} (llama.cpp's quantizer)"] for q in ON_THEIRS}
    on_theirs = {}
    for name, path in theirs_files.items():
        on_theirs[name] = r = evaluate_file(path, data, tok)
        assert r["tokens"] == n_targets
        say(f"jaxllama on {name}: ppl {r['perplexity']:.4f} (as {r['quantize']}/{r.get('group_size')})")

    # the rows evaluate read, for llama.cpp and for the same forward as evaluate's (KL divergences)
    batches = eval_batches(run, data)
    n_segments = sum(1 for b in batches for _ in segments(b))
    assert int(sum(b["loss_mask"].sum() for b in batches)) == n_targets
    say(f"{len(batches)} batches, {n_segments:,} segments, {n_targets:,} scored targets (= evaluate's)")
    jax_scores = score(batches, jaxllama_forwards(run, data, theirs_files), "float32", TEMPERATURES)
    calibration = jax_scores["float32"]["calibration"]
    for name, want in [*ours.items(), *on_theirs.items()]:  # the forward here is evaluate's: the same NLL
        got = jax_scores[name]["nll_sum"]
        assert abs(got / want["nll_sum"] - 1) < 1e-5 and jax_scores[name]["tokens"] == n_targets, (name, got, want)
    for name, _, _ in DIAGNOSIS:
        say(f"jaxllama {name}: ppl {jax_scores[name]['perplexity']:.4f}")

    models = {k: llama_cpp_model(p, args.threads) for k, p in files.items()}
    cpp_scores = score(batches, {k: llama_cpp_forward(m) for k, m in models.items()}, "f32 (our export)")
    for m in models.values():
        m.close()
    models.clear()
    for name, r in cpp_scores.items():
        assert r["tokens"] == n_targets
        say(f"llama.cpp {name}: ppl {r['perplexity']:.4f} ({r['seconds']:.1f}s)")

    base, cbase = ours["float32"]["perplexity"], cpp_scores["f32 (our export)"]["perplexity"]
    rows = []

    def row(engine, fmt, r, ref, f32=False, **extra):
        return dict(engine=engine, format=fmt, perplexity=r["perplexity"], nll_sum=r["nll_sum"], tokens=n_targets,
                    delta=None if f32 else r["perplexity"] / ref - 1, entropy=r.get("entropy"), **extra)

    for name, _, _ in OURS:
        f32 = name == "float32"
        rows.append(row("jaxllama", "float32 (the run)" if f32 else name, {**jax_scores[name], **ours[name]}, base, f32,
                        kl=None if f32 else jax_scores[name]["kl"], top1=None if f32 else jax_scores[name]["top1"]))
    for name, _, _ in DIAGNOSIS:
        rows.append(row("jaxllama (diagnosis)", name, jax_scores[name], base, kl=jax_scores[name]["kl"],
                        top1=jax_scores[name]["top1"]))
    for name, r in on_theirs.items():
        rows.append(row("jaxllama", f"{name} (as {r['quantize']}/{r.get('group_size')})", {**jax_scores[name], **r}, base,
                        kl=jax_scores[name]["kl"], top1=jax_scores[name]["top1"]))
    for name, path in files.items():
        r, f32 = cpp_scores[name], name.startswith("f32")
        rows.append(row("llama.cpp", name, r, cbase, f32, kl=None if f32 else r["kl"], top1=None if f32 else r["top1"],
                        mib=path.stat().st_size / 2**20, types=tensor_types(path)))

    identical = {q: same_tensors(files[f"{q} (llama.cpp's quantizer)"], files[f"{q.upper()} (our export)"])
                 for q in LLAMA_QUANTS}
    d = {(r["engine"], r["format"]): r for r in rows}
    i8, g128, g32 = (d["jaxllama", k] for k in ("int8 (per channel)", "int4 group 128", "int4 group 32"))
    q8, q4 = d["llama.cpp", "Q8_0 (llama.cpp's quantizer)"], d["llama.cpp", "Q4_0 (llama.cpp's quantizer)"]
    f32_gap = cbase / base - 1

    def pct(x):
        return f"{100 * x:+.3f}%"

    goals = {
        "llama.cpp f32 = jaxllama f32 (within tol)": (f"{100 * f32_gap:+.4f}%", abs(f32_gap) <= args.f32_tol),
        "int8 Δppl <= +0.5%": (pct(i8["delta"]), i8["delta"] <= 0.005),
        "int4 g128 Δppl <= +5%": (pct(g128["delta"]), g128["delta"] <= 0.05),
        "int8 Δppl <= llama.cpp Q8_0's": (f"{pct(i8['delta'])} vs {pct(q8['delta'])}", i8["delta"] <= q8["delta"]),
        "int4 g128 Δppl <= llama.cpp Q4_0's": (f"{pct(g128['delta'])} vs {pct(q4['delta'])}",
                                              g128["delta"] <= q4["delta"]),
        "int8 KL <= llama.cpp Q8_0's": (f"{i8['kl']:.2e} vs {q8['kl']:.2e}", i8["kl"] <= q8["kl"]),
        "int4 g128 KL <= llama.cpp Q4_0's": (f"{g128['kl']:.2e} vs {q4['kl']:.2e}", g128["kl"] <= q4["kl"]),
        "int4 g32 (Q4_0's block size) KL <= llama.cpp Q4_0's": (f"{g32['kl']:.2e} vs {q4['kl']:.2e}",
                                                               g32["kl"] <= q4["kl"]),
    }
    print(table(rows))
    print()
    for k, (v, ok) in goals.items():
        print(f"- {k}: {v} -> {'met' if ok else 'NOT met'}")
    print("- mean next-token entropy (nats; higher = flatter): " + "; ".join(
        f"{r['engine']} {r['format']} {r['entropy']:.4f}" for r in rows))
    print("- float32 perplexity at temperature T (the model's own calibration): "
          + ", ".join(f"T={t}: {p:.4f}" for t, p in calibration.items()))
    print("- our GGUF exports' tensors (names, types, bytes) = llama.cpp's quantization of our f32 file: "
          + ", ".join(f"{q} {'identical' if same else 'DIFFERENT'}" for q, same in identical.items()))
    total = time.perf_counter() - t0
    print(f"\ntraining: {args.steps} steps ({info['seconds']:.0f}s), loss {info['first_loss']:.4f} -> "
          f"{info['final_loss']:.4f} (last logged step); held-out: {len(held['files'])} unseen stdlib files, "
          f"{n_targets:,} scored tokens in {n_segments:,} segments; total {total:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(train=info, heldout=held, rows=rows, f32_gap=f32_gap,
                                                   identical_exports=identical, calibration=calibration,
                                                   goals={k: dict(value=v, met=ok) for k, (v, ok) in goals.items()},
                                                   seconds=total), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
