"""Serving under load: `jaxllama serve` vs llama-cpp-python's server, same weights, same requests, over loopback.

What is measured. Each engine runs as its own server process on 127.0.0.1 and gets the same fixed,
seeded mix of requests: prompts of 16-256 tokens, outputs of 16-128 tokens (``max_tokens`` per
request), greedy (temperature 0), streamed (``stream: true``, SSE on ``/v1/completions``). The mix is
replayed by N client threads at concurrency 1, 4 and 16 (``--requests`` per level; every level has its
own prompt texts of the same lengths, so no prefix cache is reused across levels). Per (engine,
concurrency) one JSON line: aggregate output tokens/s (all output tokens / the level's wall time),
time to first token p50/p99 (request sent -> first chunk with text), inter-token latency p50/p99 (gaps
between consecutive text chunks; ``itl_mean_ms`` is (last - first chunk) / (tokens - 1)), errors
(non-200, an error chunk, no ``[DONE]``, a timeout: must be 0), requests that stopped before
``max_tokens`` (``short``), and the server's RSS (process tree, MiB) before and after the level.
Output tokens are the server's ``usage.completion_tokens`` when it streams usage, else its text chunks
(``tokens_from``). A final phase (``--leak-requests``, default 500, concurrency 16, outputs capped at
``--leak-max-tokens``; for ``--leak-engines``, default ours only: llama-cpp-python's server runs one
request at a time, 500 would take it ~10 min here) samples the RSS through the run: ``leak_ok`` if it grew by at most
``--leak-tol-mib`` over the second half. The last line is the summary with the issue's two goals:
our tok/s at concurrency 16 >= 4x ours at 1, and >= 1.5x llama.cpp's at 16.

The model has the shape of a published 135M Llama (dim 576, 30 layers, 9/3 heads, ffn 1536, vocab
49152, tied embeddings) with random weights, written with the repo's own tools as a Hugging Face
folder (a SentencePiece BPE tokenizer of 8000 pieces; the model's vocab stays 49152) and exported
with ``jaxllama convert --to gguf --gguf-type f32`` for llama.cpp; both are cached under ``--work``.
So that every request runs to ``max_tokens`` and both engines emit one text chunk per token, the
embedding rows of EOS, of the other special and byte pieces and of ids beyond the tokenizer are zero:
their logits are exactly 0, below the greedy maximum. Prompts are sent as text (llama-cpp-python's
server takes no token-id lists) built from whole words so that SentencePiece and llama.cpp's
tokenizer (the same vocab) give the same count; each line reports the prompt tokens the server saw.
llama.cpp runs with 2 threads, ``n_ctx`` 512, ``repeat_penalty`` 1 (its default 1.1 is not greedy)
and ``interrupt_requests`` off (on, it cuts a stream short whenever another request waits).

    python benchmarks/serve_load.py --work /tmp/serve_load            # both engines, 32 requests a level
    python benchmarks/serve_load.py --engines llamacpp --requests 8 --leak-requests 0
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_throughput import SHAPE  # noqa: E402 (the 135M shape's overrides)

PIECES = 8000
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


def _lexicon(seed: int = 0, n: int = 20000) -> list[str]:
    rng = random.Random(seed)
    syl = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["an", "el", "in", "or", "us"]
    return sorted({"".join(rng.choice(syl) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(n)})


def _build(work: Path) -> None:
    """Train the tokenizer, make random weights, write the Hugging Face folder (runs in its own process)."""
    import io

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import sentencepiece as spm

    from jaxllama.config import load_config
    from jaxllama.convert.common import Extras, ParamsSource
    from jaxllama.convert.hf import write_hf
    from jaxllama.model.llama import Arch, Llama

    words = _lexicon()
    rng = random.Random(1)
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf-like word frequencies
    lines = [" ".join(rng.choices(words, weights, k=12)) for _ in range(30000)]
    tok_dir = work / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=PIECES,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2)
    (tok_dir / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    m = load_config(None, [*SHAPE, "data.seq_len=512"]).model
    shapes = nn.unbox(jax.eval_shape(lambda: Llama(Arch.from_config(m)).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    nrng = np.random.default_rng(0)

    def fill(path, leaf):  # O(1) activations, as tests/helpers.random_params
        name = path[-1].key
        if name == "scale":
            return (1.0 + 0.2 * nrng.standard_normal(leaf.shape)).astype(np.float32)
        std = 1.0 if name == "embedding" else 1.0 / np.sqrt(leaf.shape[-2])
        x = (std * nrng.standard_normal(leaf.shape)).astype(np.float32)
        if name == "embedding":  # logits exactly 0 for pieces that must never be sampled
            x[[i for i in range(PIECES) if not sp.IsUnused(i) and (sp.IsControl(i) or sp.IsUnknown(i)
                                                                   or sp.IsByte(i))]] = 0
            x[PIECES:] = 0
        return x

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    write_hf(ParamsSource(params, m, Extras(tokenizer_dir=tok_dir, bos_token_id=sp.bos_id(),
                                            eos_token_id=sp.eos_id())), work / "hf.tmp")
    (work / "hf.tmp").rename(work / "hf")


def build_model(work: Path) -> tuple[Path, Path]:
    """The cached Hugging Face folder and f32 GGUF under ``work``, built when missing."""
    hf, gguf = work / "hf", work / "model-f32.gguf"
    if not (hf / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--build-only", "--work", str(work)], check=True)
    if not gguf.exists():
        tmp = work / "model-f32.tmp.gguf"
        tmp.unlink(missing_ok=True)
        subprocess.run([str(BIN / "jaxllama"), "convert", str(hf), str(tmp), "--to", "gguf", "--gguf-type", "f32"],
                       check=True)
        tmp.rename(gguf)
    return hf, gguf


def make_requests(hf: Path, n: int, seed: int, salt: int, max_out: int | None = None) -> list[dict]:
    """``n`` requests: prompt lengths 16-256 and outputs 16-128 tokens from ``seed`` (the same mix for every
    salt), prompt words from ``seed`` and ``salt`` (new text of the same token counts)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    words = _lexicon()
    cost: dict[int, list[str]] = {}
    for w in words:
        cost.setdefault(len(sp.encode(w)), []).append(w)
    lens = np.random.default_rng(seed)
    shape = [(int(lens.integers(16, 257)), int(lens.integers(16, 129))) for _ in range(n)]
    rng = random.Random(seed * 1000 + salt)
    out = []
    for p_len, o_len in shape:
        while True:
            picked, total = [], 0
            while total < p_len:
                k = min(p_len - total, rng.choice(list(cost)))
                picked.append(rng.choice(cost[k] if k in cost else cost[1]))
                total += len(sp.encode(picked[-1]))
            text = " ".join(picked)
            if len(sp.encode(text)) == p_len:
                break
        out.append(dict(prompt=text, prompt_len=p_len, max_tokens=min(o_len, max_out or o_len)))
    return out


def stream_one(port: int, body: dict, timeout: float) -> dict:
    """POST one streamed completion; the arrival time of every text chunk, usage and finish reason."""
    res: dict = dict(ok=False, times=[], usage=None, finish=None, error=None)
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            res["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return res
        while line := resp.readline():
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                res["ok"] = res["error"] is None
                break
            now = time.perf_counter()
            obj = json.loads(data)
            if "error" in obj:
                res["error"] = f"error chunk: {str(obj['error'])[:300]}"
            res["usage"] = obj.get("usage") or res["usage"]
            for ch in obj.get("choices") or []:
                if ch.get("text"):
                    res["times"].append(now - t0)
                res["finish"] = ch.get("finish_reason") or res["finish"]
        else:
            res["error"] = res["error"] or "stream ended without [DONE]"
    except Exception as e:  # noqa: BLE001 (every failure is an error of the run)
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    if res["ok"] and not res["times"]:
        res.update(ok=False, error="no text chunks")
    return res


def run_level(port: int, bodies: list[dict], concurrency: int, wall_s: float, timeout: float) -> tuple[list, float]:
    """Send ``bodies`` from ``concurrency`` threads until done or ``wall_s`` passed; results and wall time."""
    results: list = [None] * len(bodies)
    nxt, lock = iter(range(len(bodies))), threading.Lock()
    start = time.perf_counter()

    def worker() -> None:
        while time.perf_counter() - start < wall_s:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = stream_one(port, bodies[i], timeout)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(wall_s + timeout + 5)
    return results, time.perf_counter() - start


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else None


def summarize(results: list, reqs: list[dict], wall: float) -> dict:
    """The JSON figures of one level (times in ms)."""
    done = [(r, q) for r, q in zip(results, reqs) if r is not None]
    good = [(r, q) for r, q in done if r["ok"]]
    ntok = [r["usage"]["completion_tokens"] if r["usage"] else len(r["times"]) for r, _ in good]
    ttft = [r["times"][0] for r, _ in good]
    gaps = [b - a for r, _ in good for a, b in zip(r["times"], r["times"][1:])]
    span = sum(r["times"][-1] - r["times"][0] for r, _ in good)
    seen = [r["usage"].get("prompt_tokens") for r, _ in good if r["usage"]]
    errs = [r["error"] for r, _ in done if not r["ok"]]
    return dict(requests=len(reqs), completed=len(good), errors=len(errs), skipped=len(reqs) - len(done),
                first_error=errs[0] if errs else None, output_tokens=sum(ntok), wall_s=round(wall, 2),
                tok_s=round(sum(ntok) / wall, 2), ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99),
                itl_p50_ms=pct(gaps, 50), itl_p99_ms=pct(gaps, 99),
                itl_mean_ms=round(1000 * span / max(1, sum(ntok) - len(good)), 2),
                short=sum(n < q["max_tokens"] for n, (_, q) in zip(ntok, good)),
                tokens_per_chunk=round(sum(ntok) / max(1, sum(len(r["times"]) for r, _ in good)), 3),
                tokens_from="usage" if good and all(r["usage"] for r, _ in good) else "chunks",
                prompt_tokens_sent=sum(q["prompt_len"] for _, q in good),
                prompt_tokens_seen=sum(seen) if seen and len(seen) == len(good) else None)


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, MiB."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                kids.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
            except (OSError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            total += int(next(x for x in Path(f"/proc/{p}/status").read_text().splitlines()
                              if x.startswith("VmRSS")).split()[1])
        except (OSError, StopIteration):
            pass
    return round(total / 1024, 1)


def server_cmd(engine: str, hf: Path, gguf: Path, port: int, slots: int) -> tuple[list[str], str]:
    """The command that starts ``engine`` and the path that answers 200 once it is ready."""
    if engine == "jaxllama":
        return [str(BIN / "jaxllama"), "serve", str(hf), "--host", HOST, "--port", str(port), "--slots", str(slots),
                "--max-len", "512"], "/health"
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", HOST, "--port", str(port),
            "--n_ctx", "512", "--n_threads", "2", "--n_threads_batch", "2", "--interrupt_requests", "False",
            "--verbose", "False"], "/v1/models"


def call(port: int, path: str, body: dict | None = None) -> tuple[int, bytes]:
    """GET ``path`` (or POST ``body`` as JSON): status and body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("GET" if body is None else "POST", path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, path: str, timeout: float, log: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if call(port, path)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f}s: {log.read_text()[-2000:]}")


def bench_engine(engine: str, args, hf: Path, gguf: Path, port: int) -> list[dict]:
    """Start ``engine``, warm it up, run every level and the leak phase; one dict per line printed."""
    cmd, ready = server_cmd(engine, hf, gguf, port, args.slots)
    log = args.work / f"{engine}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    try:
        wait_ready(proc, port, ready, args.ready_timeout_s, log)
        model = json.loads(call(port, "/v1/models")[1])["data"][0]["id"]
        extra = dict(repeat_penalty=1.0) if engine == "llamacpp" else dict(ignore_eos=True)

        def bodies(reqs):
            return [dict(model=model, prompt=q["prompt"], max_tokens=q["max_tokens"], temperature=0.0, stream=True,
                         stream_options=dict(include_usage=True), **extra) for q in reqs]

        # warm-up (compilation): the shortest and longest prompts alone, then one burst at the highest level
        warm = make_requests(hf, max(args.warmup, 2), args.seed, 99, max_out=8)
        warm.sort(key=lambda q: q["prompt_len"])
        for r in bodies([warm[0], warm[-1]]):
            stream_one(port, r, args.request_timeout_s)
        run_level(port, bodies(warm), max(args.concurrency), args.timeout_s, args.request_timeout_s)
        for level, c in enumerate(args.concurrency):
            reqs = make_requests(hf, args.requests, args.seed, level)
            load = os.getloadavg()[0]
            before = rss_mib(proc.pid)
            results, wall = run_level(port, bodies(reqs), c, args.timeout_s, args.request_timeout_s)
            line = dict(engine=engine, concurrency=c, **summarize(results, reqs, wall), rss_before_mib=before,
                        rss_after_mib=rss_mib(proc.pid), load_1m_before=round(load, 2))
            if engine == "llamacpp":  # it streams no usage: its tokenizer's count, untimed
                line["prompt_tokens_seen"] = sum(len(json.loads(call(port, "/extras/tokenize", dict(
                    input=q["prompt"]))[1])["tokens"]) for q in reqs)  # /extras/tokenize: BOS included
            print(json.dumps(line), flush=True)
            lines.append(line)
        if args.leak_requests and engine in args.leak_engines.split(","):
            reqs = make_requests(hf, args.leak_requests, args.seed, 50, max_out=args.leak_max_tokens)
            samples, stop = [(0.0, rss_mib(proc.pid))], threading.Event()

            def sample() -> None:
                t0 = time.perf_counter()
                while not stop.wait(1.0):
                    samples.append((time.perf_counter() - t0, rss_mib(proc.pid)))

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            results, wall = run_level(port, bodies(reqs), max(args.concurrency), args.leak_timeout_s,
                                      args.request_timeout_s)
            stop.set()
            th.join()
            samples.append((wall, rss_mib(proc.pid)))
            mid = min(samples, key=lambda s: abs(s[0] - wall / 2))[1]
            s = summarize(results, reqs, wall)
            line = dict(engine=engine, phase="leak", concurrency=max(args.concurrency),
                        **{k: s[k] for k in ("requests", "completed", "errors", "skipped", "first_error", "wall_s",
                                             "tok_s")},
                        rss_start_mib=samples[0][1], rss_mid_mib=mid, rss_end_mib=samples[-1][1],
                        rss_max_mib=max(x for _, x in samples),
                        leak_ok=samples[-1][1] - mid <= args.leak_tol_mib and s["skipped"] == 0)
            print(json.dumps(line), flush=True)
            lines.append(line)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="jaxllama,llamacpp")
    p.add_argument("--concurrency", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--leak-requests", type=int, default=500, help="the RSS phase at the top level (0: skip)")
    p.add_argument("--leak-engines", default="jaxllama", help="engines that get the RSS phase")
    p.add_argument("--leak-max-tokens", type=int, default=16, help="output cap in the RSS phase")
    p.add_argument("--leak-tol-mib", type=float, default=32.0, help="allowed RSS growth over its second half")
    p.add_argument("--timeout-s", type=float, default=900, help="wall-time bound of one level")
    p.add_argument("--leak-timeout-s", type=float, default=1800, help="wall-time bound of the RSS phase")
    p.add_argument("--request-timeout-s", type=float, default=300, help="socket timeout of one request")
    p.add_argument("--ready-timeout-s", type=float, default=600)
    p.add_argument("--warmup", type=int, default=16, help="warm-up requests (outputs of 8 tokens)")
    p.add_argument("--slots", type=int, default=16, help="jaxllama serve --slots")
    p.add_argument("--port", type=int, default=18431)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/jaxllama-serve-load"), help="model cache and logs")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        _build(args.work)
        return
    hf, gguf = build_model(args.work)
    out: dict = {}
    for i, engine in enumerate(args.engines.split(",")):
        if engine not in ("jaxllama", "llamacpp"):
            raise SystemExit(f"unknown engine {engine!r} (jaxllama, llamacpp)")
        out[engine] = bench_engine(engine, args, hf, gguf, args.port + i)
    top, low = max(args.concurrency), min(args.concurrency)
    tok = {e: {r["concurrency"]: r["tok_s"] for r in rows if "phase" not in r} for e, rows in out.items()}
    ours = tok.get("jaxllama", {})
    summary: dict = dict(summary=True, machine=f"{os.cpu_count()}-core CPU", date=time.strftime("%Y-%m-%d"),
                         errors=sum(r["errors"] + r["skipped"] for rows in out.values() for r in rows),
                         leak_ok={e: r["leak_ok"] for e, rows in out.items() for r in rows if "phase" in r})
    if ours.get(low):
        summary["scaling"] = round(ours[top] / ours[low], 2)
        summary["goal_scaling_4x"] = summary["scaling"] >= 4
    if ours.get(top) and tok.get("llamacpp", {}).get(top):
        summary["vs_llamacpp"] = round(ours[top] / tok["llamacpp"][top], 2)
        summary["goal_vs_llamacpp_1_5x"] = summary["vs_llamacpp"] >= 1.5
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
