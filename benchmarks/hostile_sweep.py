"""Hostile-input sweep: run the ``jaxllama`` CLI as a careless or hostile user would, classify each outcome.

Every case is one CLI command (``python -m jaxllama.cli ...``) in a subprocess whose working directory is
the case's own temp folder, after a setup that builds the hostile input there (damaged checkpoints,
lying safetensors/GGUF/config.json/params.json files, YAML bombs, huge records, runaway chat templates,
signals mid-run). All inputs are made by this script: a tokenizer and a tiny text run are trained once
(``jaxllama tokenizer train``, ``jaxllama train model.preset=debug ...``, ~20 s) and exported once to
Hugging Face, GGUF and Meta (``jaxllama convert``); each case works on its own copy.

Each outcome is classified:

  clean         the expected outcome. A refused input: non-zero exit, stderr's last line starts with
                ``jaxllama: error:``, no "Traceback", every stderr line under 1,000 characters and at
                most 20 lines (warnings printed by libraries are allowed but count). A recovered input
                (a damaged checkpoint falling back, a capped --max-new-tokens, ...): the expected exit
                code (0, or 130 for Ctrl-C) and the case's check of the outputs passes.
  traceback     "Traceback" in stderr or stdout.
  silent_wrong  exit 0 where the input must be refused, or a check of the outputs that fails (a
                config.yaml rewritten by a refused resume, duplicated metrics steps, ...).
  unbounded     past the wall-clock timeout (--timeout, default 120 s), resident memory of the process
                tree over --rss-gib (default 4 GiB; VmRSS from /proc sampled every 0.2 s), or more than
                256 MiB of stdout: the process group is killed.
  failed        none of the above, yet not as expected: a refusal that is not one clean error line
                (too many or too long lines, killed by a signal), or a recovery that exited non-zero.
  setup_error   the case's setup (or a shared fixture: the trained run, an export) failed; the command
                under test did not run. Reported, never a crash of the sweep.
  skipped       the case cannot be built on this machine (e.g. no read-only folder and running as root).

Run it from the repository root, in the project's environment:

    python benchmarks/hostile_sweep.py                  # every case (44; 5 minutes on 2 cores)
    python benchmarks/hostile_sweep.py --list           # the case names
    python benchmarks/hostile_sweep.py --only convert/  # the cases whose name contains the substring
    python benchmarks/hostile_sweep.py --timeout 60 --rss-gib 4 --keep --json sweep.json

It prints one line per case, then the summary as one JSON line: ``{"tried": N, "clean": .., "traceback":
.., "silent_wrong": .., "unbounded": .., "failed": .., "setup_error": .., "skipped": .., "cases": [...]}``
(each case: name, status, rc, wall_s, peak_rss_mib, note, stderr_tail). The sweep reports; it fixes
nothing. Exit status 0 when every case tried is clean, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
MAX_LINE, MAX_LINES = 1000, 20
STDOUT_CAP = 256 << 20
SAMPLE_S = 0.2
STATUSES = ("clean", "traceback", "silent_wrong", "unbounded", "failed", "setup_error", "skipped")


class SetupError(Exception):
    """A case's input could not be built (reported as setup_error)."""


class Skip(Exception):
    """The case cannot be built on this machine (reported as skipped)."""


# ---- running one command, watched ---------------------------------------------------------------


def _vmrss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return out


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (Linux /proc)."""
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _vmrss_kib(pid)
        todo += _children(pid)
    return total << 10


class Watched:
    """``python -m jaxllama.cli ARGS`` in ``cwd``, stdout/stderr to files, in its own process group;
    killed (the whole group) past the deadline, the memory bound or the stdout cap."""

    def __init__(self, args: list[str], cwd: Path, timeout: float, rss_limit: int, tag: str = "cmd"):
        self.args, self.cwd, self.timeout, self.rss_limit = args, cwd, timeout, rss_limit
        self.out_path, self.err_path = cwd / f".{tag}.stdout", cwd / f".{tag}.stderr"
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "jaxllama.cli", *args], cwd=cwd, env=ENV,
                                  stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                  start_new_session=True)
        self.peak = 0
        self.killed: str | None = None
        self.wall = 0.0

    @property
    def pid(self) -> int:
        return self.p.pid

    def running(self) -> bool:
        return self.p.poll() is None

    def sample(self) -> bool:
        """One watch step; False once the process has ended."""
        if self.p.poll() is not None:
            self._end()
            return False
        self.peak = max(self.peak, tree_rss_bytes(self.p.pid))
        elapsed = time.monotonic() - self.t0
        reason = None
        if self.peak > self.rss_limit:
            reason = f"resident memory {self.peak / 2**30:.2f} GiB over {self.rss_limit / 2**30:.1f} GiB"
        elif elapsed > self.timeout:
            reason = f"still running after {self.timeout:.0f} s"
        elif self._size(self.out_path) > STDOUT_CAP:
            reason = f"stdout over {STDOUT_CAP >> 20} MiB"
        if reason:
            self.killed = reason
            self.kill()
            return False
        return True

    def wait_for(self, cond: Callable[[], bool], max_s: float, every: float = SAMPLE_S) -> bool:
        """Watch until ``cond()`` holds (True), or the process ends / is killed / ``max_s`` passes (False)."""
        end = time.monotonic() + max_s
        last = 0.0
        while time.monotonic() < end:
            if cond():
                return True
            now = time.monotonic()
            if now - last >= SAMPLE_S:
                last = now
                if not self.sample():
                    return cond()
            elif not self.running():
                self._end()
                return cond()
            time.sleep(every)
        return cond()

    def finish(self) -> "Result":
        while self.sample():
            time.sleep(SAMPLE_S)
        return self.result()

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._end()

    def signal(self, sig: int, group: bool = False) -> None:
        try:
            os.killpg(self.p.pid, sig) if group else os.kill(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def _end(self) -> None:
        if not self.wall:
            self.wall = time.monotonic() - self.t0
            for f in (self._out, self._err):
                try:
                    f.close()
                except OSError:
                    pass

    @staticmethod
    def _size(p: Path) -> int:
        try:
            return p.stat().st_size
        except OSError:
            return 0

    def result(self) -> "Result":
        self._end()
        return Result(self.p.returncode, _read_capped(self.out_path), _read_capped(self.err_path),
                      self.wall, self.peak, self.killed)


def _read_capped(p: Path, cap: int = 8 << 20) -> str:
    """The file's text; past ``cap``, its first and last cap/2 bytes."""
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            if size <= cap:
                data = f.read()
            else:
                head = f.read(cap // 2)
                f.seek(size - cap // 2)
                data = head + b"\n[...]\n" + f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    wall: float
    peak: int
    killed: str | None

    @property
    def lines(self) -> list[str]:
        return [x for x in self.stderr.splitlines() if x.strip()]

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr


@dataclass
class Outcome:
    status: str
    note: str = ""
    result: Result | None = None


def _traceback_note(text: str) -> str:
    """How many tracebacks, and the first one's exception line (and its 'Exception ignored in' context)."""
    lines = text.splitlines()
    at = [i for i, x in enumerate(lines) if "Traceback" in x]
    i = at[0]
    exc = next((x for x in lines[i + 1:] if x.strip() and not x.startswith(" ")), "?")
    where = lines[i - 1].strip() if i and lines[i - 1].startswith(("Exception ignored", "During handling")) else ""
    return (f"{len(at)} traceback{'s' * (len(at) > 1)}, first: {exc[:160]}"
            + (f" [{where[:90]}]" if where else ""))


def judge(res: Result, expect: str, rc: int = 0, check: Callable[[Result], str | None] | None = None) -> Outcome:
    """Classify one result. ``expect``: "refuse" or "ok" (exit ``rc``). ``check(res)`` returns a failure
    reason or None; a failing check is silent_wrong (after a refusal too: e.g. a file it changed)."""
    if res.killed:
        return Outcome("unbounded", res.killed, res)
    if "Traceback" in res.stderr or "Traceback" in res.stdout:
        return Outcome("traceback", f"exit {res.rc}, " + _traceback_note(res.stderr + "\n" + res.stdout), res)
    if expect == "refuse":
        if res.rc == 0:
            return Outcome("silent_wrong", "exit 0 where it must be refused", res)
        lines = res.lines
        problems = []
        if res.rc is None or res.rc < 0:
            problems.append(f"killed by signal {-res.rc if res.rc else '?'}")
        if not lines or not lines[-1].startswith("jaxllama: error:"):
            problems.append("last stderr line is not 'jaxllama: error: ...'")
        if any(len(x) >= MAX_LINE for x in lines):
            problems.append(f"a stderr line of {max(len(x) for x in lines):,} characters")
        if len(lines) > MAX_LINES:
            problems.append(f"{len(lines)} stderr lines")
        if problems:
            return Outcome("failed", f"exit {res.rc}: " + "; ".join(problems), res)
        note = f"exit {res.rc}" + ("" if len(lines) == 1 else f", {len(lines)} stderr lines")
    else:
        if res.rc != rc:
            return Outcome("failed", f"exit {res.rc}, expected {rc}", res)
        note = f"exit {res.rc}"
    if check is not None:
        try:
            why = check(res)
        except Exception as e:  # a check that cannot even read the outputs: they are wrong
            why = f"check raised {type(e).__name__}: {e}"
        if why:
            return Outcome("silent_wrong", why, res)
    return Outcome("clean", note, res)


# ---- fixtures: built once, lazily, shared by copying ---------------------------------------------


WORDS = ("the quick brown fox jumps over a lazy dog while data flows into the model and we import os "
         "def return class value print for each token in range of numbers").split()


class Ctx:
    def __init__(self, root: Path, timeout: float, rss_limit: int):
        self.root, self.timeout, self.rss_limit = root, timeout, rss_limit
        self.fx_dir = root / "fixtures"
        self.fx_dir.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, Path | SetupError] = {}

    def fx(self, name: str) -> Path:
        """A shared fixture (built on first use); a failed build is re-raised to every case that needs it."""
        got = self._cache.get(name)
        if isinstance(got, SetupError):
            raise got
        if got is None:
            t0 = time.monotonic()
            try:
                got = FIXTURES[name](self)
            except SetupError as e:
                self._cache[name] = SetupError(f"fixture {name}: {e}")
                raise self._cache[name] from None
            except Exception as e:
                self._cache[name] = SetupError(f"fixture {name}: {type(e).__name__}: {e}")
                raise self._cache[name] from None
            self._cache[name] = got
            print(f"  (fixture {name} built in {time.monotonic() - t0:.1f} s)", flush=True)
        return got

    def cli(self, args: list[str], cwd: Path, timeout: float = 300) -> Result:
        """A setup command: must exit 0 (else SetupError with its last stderr line)."""
        res = Watched(args, cwd, timeout, max(self.rss_limit, 4 << 30), tag="setup").finish()
        if res.rc != 0 or res.killed:
            last = (res.lines or ["(no stderr)"])[-1][:300]
            raise SetupError(f"`jaxllama {' '.join(args)[:120]}` -> "
                             f"{res.killed or f'exit {res.rc}'}: {last}")
        return res

    def watch(self, args: list[str], cwd: Path, tag: str = "cmd") -> Watched:
        return Watched(args, cwd, self.timeout, self.rss_limit, tag=tag)

    def copy_run(self, dst: Path) -> Path:
        shutil.copytree(self.fx("run"), dst, ignore=shutil.ignore_patterns(".lock", ".setup.*"))
        return dst


def train_args(ctx: Ctx, run_dir: str, *extra: str, steps: int = 4, every: int = 2) -> list[str]:
    """The tiny text run every checkpoint case trains or resumes (the same settings, so it resumes)."""
    return ["train", "model.preset=debug", "model.vocab_size=300", f"data.source={ctx.fx('text')}",
            "data.format=lines", f"data.tokenizer={ctx.fx('tok')}", "data.seq_len=32", "data.global_batch=8",
            f"train.steps={steps}", f"checkpoint.every={every}", "train.log_every=1", "train.progress=false",
            "train.tensorboard=false", f"run_dir={run_dir}", *extra]


SAFE = {  # a config that would train for seconds if a hostile override were (wrongly) accepted
    "model.preset": "debug", "data.source": "synthetic", "data.seq_len": "32", "data.global_batch": "8",
    "train.steps": "2", "checkpoint.enabled": "false", "train.progress": "false", "train.tensorboard": "false",
    "run_dir": "X",
}


def safe_args(**changes: str | None) -> list[str]:
    """SAFE with keys replaced (value) or removed (None); keys with '__' for '.' (train__steps)."""
    d = dict(SAFE)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            d.pop(k, None)
        else:
            d.pop(k, None)
            d[k] = v
    return [f"{k}={v}" for k, v in d.items()]


def _fx_text(ctx: Ctx) -> Path:
    rng = random.Random(0)
    p = ctx.fx_dir / "text.txt"
    p.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(14)) + "\n" for _ in range(3000)))
    return p


def _fx_tok(ctx: Ctx) -> Path:
    out = ctx.fx_dir / "tok.model"
    ctx.cli(["tokenizer", "train", "--input", str(ctx.fx("text")), "--format", "lines", "--vocab-size", "300",
             "--output", str(out)], ctx.fx_dir)
    return out


def _fx_run(ctx: Ctx) -> Path:
    run = ctx.fx_dir / "run"
    ctx.cli(train_args(ctx, str(run)), ctx.fx_dir)
    if not (run / "checkpoints" / "4").is_dir() or not (run / "checkpoints" / "2").is_dir():
        raise SetupError(f"{run}: expected checkpoints 2 and 4")
    return run


def _fx_export(fmt: str, name: str) -> Callable[[Ctx], Path]:
    def build(ctx: Ctx) -> Path:
        out = ctx.fx_dir / name
        ctx.cli(["convert", str(ctx.fx("run")), str(out), "--to", fmt], ctx.fx_dir)
        return out
    return build


def _write_safetensors(path: Path, tensors: dict) -> None:
    import numpy as np

    header, off = {}, 0
    for k, a in tensors.items():
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a, "<f4").tobytes())


def _fx_big_hf(ctx: Ctx) -> Path:
    """A hand-written ~150 MB Llama HF folder: a conversion long enough to be interrupted mid-write."""
    import numpy as np

    d, f, layers, heads, kv, vocab = 256, 688, 8, 8, 4, 64000
    hd = d // heads
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32) * 0.02  # noqa: E731
    t = {"model.embed_tokens.weight": r(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": r(heads * hd, d), p + "self_attn.k_proj.weight": r(kv * hd, d),
              p + "self_attn.v_proj.weight": r(kv * hd, d), p + "self_attn.o_proj.weight": r(d, heads * hd),
              p + "mlp.gate_proj.weight": r(f, d), p + "mlp.up_proj.weight": r(f, d),
              p + "mlp.down_proj.weight": r(d, f),
              p + "input_layernorm.weight": np.ones(d, np.float32),
              p + "post_attention_layernorm.weight": np.ones(d, np.float32)}
    t["model.norm.weight"] = np.ones(d, np.float32)
    t["lm_head.weight"] = r(vocab, d)
    out = ctx.fx_dir / "big-hf"
    out.mkdir()
    _write_safetensors(out / "model.safetensors", t)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu"}))
    return out


FIXTURES: dict[str, Callable[[Ctx], Path]] = {
    "text": _fx_text, "tok": _fx_tok, "run": _fx_run, "hf": _fx_export("hf", "hf"),
    "gguf": _fx_export("gguf", "model.gguf"), "meta": _fx_export("meta", "meta"), "big_hf": _fx_big_hf,
}


# ---- helpers that damage things -----------------------------------------------------------------


def latest_step(run: Path) -> Path:
    steps = [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    if not steps:
        raise SetupError(f"{run}: no checkpoints")
    return max(steps, key=lambda p: int(p.name))


def largest_file(folder: Path) -> Path:
    files = [p for p in folder.rglob("*") if p.is_file() and "manifest" not in p.name
             and p.name != "commit_success.txt"]
    if not files:
        raise SetupError(f"{folder}: no files")
    return max(files, key=lambda p: p.stat().st_size)


def flip_bytes(p: Path, n: int = 64) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    p.write_bytes(bytes(data))


def metrics_problem(run: Path) -> str | None:
    """Duplicated (or unreadable) step records in RUN/metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return f"{path.name} missing"
    steps = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return f"metrics.jsonl line {i} is not JSON"
        if isinstance(rec, dict) and "step" in rec and "loss" in rec:
            steps.append(rec["step"])
    dups = sorted({s for s in steps if steps.count(s) > 1})
    return f"metrics.jsonl repeats steps {dups[:10]}" if dups else None


def safetensors_file(hf: Path, tensor: str) -> Path:
    index = hf / "model.safetensors.index.json"
    if index.is_file():
        return hf / json.loads(index.read_text())["weight_map"][tensor]
    files = sorted(hf.glob("*.safetensors"))
    if not files:
        raise SetupError(f"{hf}: no safetensors file")
    return files[0]


def rewrite_header(f: Path, edit: Callable[[dict], None]) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


GGUF_INT = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}  # GGUF value types: uint32, int32, uint64, int64


def patch_gguf_int(path: Path, key: str, value: int) -> None:
    """Overwrite an integer metadata value in place (key: u64 length + bytes, then u32 type, then value)."""
    raw = bytearray(path.read_bytes())
    kb = key.encode()
    at = raw.find(struct.pack("<Q", len(kb)) + kb)
    if at < 0:
        raise SetupError(f"{path.name}: no metadata key {key}")
    t_at = at + 8 + len(kb)
    (vtype,) = struct.unpack("<I", raw[t_at:t_at + 4])
    if vtype not in GGUF_INT:
        raise SetupError(f"{path.name}: {key} has value type {vtype}, not an integer")
    fmt = GGUF_INT[vtype]
    raw[t_at + 4:t_at + 4 + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw))


def read_only_folder(case_dir: Path) -> Path:
    """A folder nothing can be created in: a read-only mount under the temp dir, else (not root) a chmod."""
    tmp = os.path.realpath(tempfile.gettempdir())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and "ro" in parts[3].split(",") and parts[1].startswith(tmp + "/") \
                        and os.path.isdir(parts[1]):
                    return Path(parts[1])
    except OSError:
        pass
    if os.geteuid() != 0:
        ro = case_dir / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    raise Skip("no read-only mount under the temp dir, and root may write in any chmod'ed folder")


def alias_bomb(levels: int = 10, width: int = 9, indent: str = "  ") -> str:
    """Billion laughs: ``a: &a [x,...]``, ``b: &b [*a,...]``, ...: width**levels values in ~340 bytes."""
    names = "abcdefghijklmnopqrstuvwxyz"[:levels]
    lines = [f"{indent}a: &a [{','.join(['x'] * width)}]"]
    lines += [f"{indent}{n}: &{n} [{','.join([f'*{p}'] * width)}]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


# ---- the cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    what: str
    expect: str = "refuse"  # "refuse" | "ok"
    setup: Callable[[Ctx, Path], list[str]] | None = None  # builds the input, returns the CLI args
    check: Callable[[Ctx, Path, Result], str | None] | None = None
    rc: int = 0  # the exit code an "ok" case expects
    quote: str | None = None  # when clean: the first output line containing this becomes the note
    custom: Callable[[Ctx, Path], Outcome] | None = None  # runs the case itself (signals, two processes)
    extra: dict = field(default_factory=dict)


CASES: list[Case] = []


def case(name: str, what: str, expect: str = "refuse", check=None, rc: int = 0, quote: str | None = None):
    def deco(fn):
        CASES.append(Case(name, what, expect, setup=fn, check=check, rc=rc, quote=quote))
        return fn
    return deco


def custom_case(name: str, what: str):
    def deco(fn):
        CASES.append(Case(name, what, custom=fn))
        return fn
    return deco


# -- checkpoints


def falls_back(ctx: Ctx, d: Path, res: Result) -> str | None:
    if "falling back" not in res.output:
        return "exit 0 but no 'falling back' message"
    return metrics_problem(d / "R")


@case("ckpt/flip-64-bytes", "64 bytes flipped (same size) in the largest file of the latest params: resume falls back",
      "ok", falls_back, quote="falling back")
def _(ctx, d):
    run = ctx.copy_run(d / "R")
    flip_bytes(largest_file(latest_step(run) / "params"))
    return train_args(ctx, "R")


@case("ckpt/truncated-file", "the largest file of the latest params cut to half: resume falls back", "ok", falls_back,
      quote="falling back")
def _(ctx, d):
    run = ctx.copy_run(d / "R")
    f = largest_file(latest_step(run) / "params")
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return train_args(ctx, "R")


def _data_state(state):
    def setup(ctx, d):
        run = ctx.copy_run(d / "R")
        f = latest_step(run) / "data" / "process_0-of-1.json"
        if not f.is_file():
            raise SetupError(f"{f.relative_to(d)} missing")
        f.write_text(json.dumps(state))
        return train_args(ctx, "R")
    return setup


case("ckpt/data-state-negative", 'data state {"position": -100}: resume falls back', "ok", falls_back,
     quote="falling back")(_data_state({"position": -100}))
case("ckpt/data-state-string", 'data state "abc": resume falls back', "ok", falls_back,
     quote="falling back")(_data_state("abc"))


def _config_unchanged(ctx, d, res):
    before = (d / "config.yaml.before").read_bytes()
    return None if (d / "R" / "config.yaml").read_bytes() == before else "R/config.yaml was rewritten"


@case("ckpt/refused-resume-keeps-config", "resume with model.dim=48: refused, R/config.yaml unchanged",
      check=_config_unchanged)
def _(ctx, d):
    run = ctx.copy_run(d / "R")
    shutil.copy(run / "config.yaml", d / "config.yaml.before")
    return train_args(ctx, "R", "model.dim=48")


@custom_case("ckpt/second-run-same-dir", "a second train on a run dir in use: refused in one line; the first "
             "finishes (exit 0), metrics.jsonl without duplicated steps")
def _(ctx, d):
    args = train_args(ctx, "R", steps=40, every=2)
    first = ctx.watch(args, d, tag="first")
    try:
        if not first.wait_for(lambda: (d / "R" / "checkpoints" / "2").is_dir(), ctx.timeout):
            res = first.finish() if not first.killed else first.result()
            if first.killed:
                return Outcome("unbounded", f"first run: {first.killed}", res)
            return Outcome("setup_error", f"first run ended (exit {res.rc}) before checkpoint 2", res)
        second = ctx.watch(args, d, tag="second").finish()
        first_alive = first.running()
        out2 = judge(second, "refuse")
        res1 = first.finish()
    finally:
        if first.running():
            first.kill()
    if out2.status == "silent_wrong" and not first_alive:
        return Outcome("setup_error", "the first run ended before the second one finished starting", second)
    if out2.status != "clean":
        note = f"second run: {out2.note}" if out2.note else "second run"
        if out2.status == "silent_wrong":
            note = "second run on the same run dir exited 0 (not refused)"
        return Outcome(out2.status, note, second)
    out1 = judge(res1, "ok", check=lambda r: metrics_problem(d / "R"))
    if out1.status != "clean":
        return Outcome(out1.status, f"first run: {out1.note}", res1)
    one = len(second.lines) == 1
    return Outcome("clean", f"second refused (exit {second.rc}, {len(second.lines)} line{'s' * (not one)}); "
                            f"first exit 0 in {res1.wall:.0f} s", second)


# -- conversion


def _no_dst(ctx, d, res):
    left = [p.name for p in d.iterdir() if p.name.startswith(("out", ".out"))]
    return f"left behind: {left}" if left else None


def _hf_header(edit):
    def setup(ctx, d):
        hf = d / "hf"
        shutil.copytree(ctx.fx("hf"), hf)
        f = safetensors_file(hf, "model.norm.weight")
        if edit == "length":
            f.write_bytes(struct.pack("<Q", f.stat().st_size) + f.read_bytes()[8:])
        elif edit == "json":
            raw = f.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            f.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n:])
        else:
            rewrite_header(f, edit)
        return ["convert", "hf", "out", "--to", "hf"]
    return setup


case("convert/st-negative-offsets", "safetensors data_offsets [-256, 0]", check=_no_dst)(
    _hf_header(lambda h: h["model.norm.weight"].update(data_offsets=[-256, 0])))
case("convert/st-negative-shape", "safetensors shape [-1, -64]", check=_no_dst)(
    _hf_header(lambda h: h["model.norm.weight"].update(shape=[-1, -64])))
case("convert/st-header-past-file", "safetensors header length larger than the file", check=_no_dst)(
    _hf_header("length"))
case("convert/st-header-not-json", "safetensors header of 0xff bytes (not JSON)", check=_no_dst)(_hf_header("json"))


def _gguf(patch):
    def setup(ctx, d):
        g = d / "bad.gguf"
        shutil.copy(ctx.fx("gguf"), g)
        patch(g)
        return ["convert", "bad.gguf", "out", "--to", "hf"]
    return setup


def _tensor_count_short(g: Path) -> None:
    raw = bytearray(g.read_bytes())
    if raw[:4] != b"GGUF":
        raise SetupError("not a GGUF file")
    (n,) = struct.unpack("<Q", raw[8:16])
    raw[8:16] = struct.pack("<Q", n - 1)
    g.write_bytes(bytes(raw))


case("convert/gguf-tensor-count-short", "GGUF header's tensor count one short", check=_no_dst)(
    _gguf(_tensor_count_short))
case("convert/gguf-block-count-0", "GGUF llama.block_count=0", check=_no_dst)(
    _gguf(lambda g: patch_gguf_int(g, "llama.block_count", 0)))
case("convert/gguf-block-count-1e9", "GGUF llama.block_count=10^9", check=_no_dst)(
    _gguf(lambda g: patch_gguf_int(g, "llama.block_count", 10**9)))


def _json_edit(fixture: str, file: str, changes: dict):
    def setup(ctx, d):
        src = d / "src"
        shutil.copytree(ctx.fx(fixture), src)
        p = src / file
        data = json.loads(p.read_text())
        data.update(changes)
        p.write_text(json.dumps(data))
        return ["convert", "src", "out", "--to", "hf"]
    return setup


for _name, _changes in [("hf-layers-2.5", {"num_hidden_layers": 2.5}), ("hf-heads-0", {"num_attention_heads": 0}),
                        ("hf-rope-parameters-x", {"rope_parameters": "x"}),
                        ("hf-layers-1e9", {"num_hidden_layers": 10**9})]:
    case(f"convert/{_name}", f"HF config.json {json.dumps(_changes)[1:-1]}", check=_no_dst)(
        _json_edit("hf", "config.json", _changes))
for _name, _changes in [("meta-multiple-of-0", {"multiple_of": 0}), ("meta-heads-0", {"n_heads": 0})]:
    case(f"convert/{_name}", f"Meta params.json {json.dumps(_changes)[1:-1]}", check=_no_dst)(
        _json_edit("meta", "params.json", _changes))


def _ro_untouched(ctx, d, res):
    ro = Path((d / "ro-path").read_text())
    before = set((d / "ro-before").read_text().splitlines())
    now = {p.name for p in ro.iterdir()}
    return f"{ro} gained {sorted(now - before)}" if now - before else None


@case("convert/dst-read-only", "convert into a read-only folder", check=_ro_untouched)
def _(ctx, d):
    ro = read_only_folder(d)
    (d / "ro-path").write_text(str(ro))
    (d / "ro-before").write_text("\n".join(p.name for p in ro.iterdir()))
    return ["convert", str(ctx.fx("hf")), str(ro / f"out-{os.getpid()}"), "--to", "hf"]


@case("convert/dst-under-a-file", "convert to FILE/out where FILE is a regular file",
      check=lambda ctx, d, r: None if (d / "file").read_text() == "just a file\n" else "FILE changed")
def _(ctx, d):
    (d / "file").write_text("just a file\n")
    return ["convert", str(ctx.fx("hf")), "file/out", "--to", "hf"]


def _dst_kept(ctx, d, res):
    names = sorted(p.name for p in (d / "out").iterdir())
    if names != ["keep.txt"] or (d / "out" / "keep.txt").read_text() != "mine\n":
        return f"the existing DST changed: {names}"
    stray = [p.name for p in d.iterdir() if p.name.startswith(".out.tmp-")]
    return f"left behind: {stray}" if stray else None


@case("convert/dst-exists", "convert SRC DST where DST exists (a folder with a file)", check=_dst_kept)
def _(ctx, d):
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("mine\n")
    return ["convert", str(ctx.fx("hf")), "out", "--to", "hf"]


# -- config


def _file_config(name: str, data: bytes, **changes):
    def setup(ctx, d):
        (d / name).write_bytes(data)
        return ["train", "--config", name, *safe_args(**changes)]
    return setup


_BOMB = ("model:\n dim:\n" + alias_bomb()).encode()
case("config/yaml-alias-bomb", f"--config: YAML anchors expanding to 9^10 values ({len(_BOMB)} bytes)")(
    _file_config("bomb.yaml", _BOMB, model__preset=None))
case("config/binary-file", "--config: 4,096 random bytes")(
    _file_config("random.yaml", bytes(random.Random(0).randrange(256) for _ in range(4096)), model__preset=None))
case("config/nul-byte", "--config: a NUL inside a value")(
    _file_config("nul.yaml", b"model:\n  preset: de\x00bug\n", model__preset=None))
case("config/deep-yaml", "--config: 100,000-deep [[[...]]]")(
    _file_config("deep.yaml", ("model:\n  dim: " + "[" * 100_000 + "]" * 100_000 + "\n").encode(),
                 model__preset=None))


def _overrides(**changes):
    return lambda ctx, d: ["train", *safe_args(**changes)]


for _name, _changes in [("lr-nan", {"optim.lr": "nan"}), ("lr-inf", {"optim.lr": "inf"}),
                        ("clip-norm-nan", {"optim.clip_norm": "nan"}), ("seed-negative", {"train.seed": "-1"}),
                        ("steps-not-int", {"train.steps": "abc"}), ("steps-negative", {"train.steps": "-5"}),
                        ("unknown-key", {"train.stpes": "4"})]:
    case(f"config/{_name}", " ".join(f"{k}={v}" for k, v in _changes.items()))(
        _overrides(**{k.replace(".", "__"): v for k, v in _changes.items()}))


@case("config/run-dir-empty", "run_dir= (empty)",
      check=lambda ctx, d, r: (f"created {sorted(p.name for p in d.iterdir() if not p.name.startswith('.'))}"
                               if [p for p in d.iterdir() if not p.name.startswith(".")] else None))
def _(ctx, d):
    return ["train", *safe_args(run_dir=None), "run_dir="]


# -- data


def _text_train(ctx, source: str, *extra: str) -> list[str]:
    return ["train", "model.preset=debug", "model.vocab_size=300", f"data.source={source}",
            f"data.tokenizer={ctx.fx('tok')}", "data.seq_len=32", "data.global_batch=8", "train.steps=2",
            "checkpoint.enabled=false", "train.progress=false", "train.tensorboard=false", "run_dir=X", *extra]


@case("data/50mb-jsonl-line", "data.source: one JSONL line of 50 MB")
def _(ctx, d):
    with open(d / "big.jsonl", "w") as f:
        f.write(json.dumps({"text": "the quick brown fox " * (50 * 2**20 // 20)}) + "\n")
    return _text_train(ctx, "big.jsonl", "data.format=jsonl")


LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"


def _chat_setup(ctx, d) -> None:
    tok = d / "tokdir"
    tok.mkdir()
    shutil.copy(ctx.fx("tok"), tok / "tokenizer.model")
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": LOOP}))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    (d / "chat.jsonl").write_text("".join(json.dumps({"messages": msgs}) + "\n" for _ in range(4)))


@case("data/chat-template-loop-train", "train data.format=chat, a template of 10^5 x 10^5 nested loops")
def _(ctx, d):
    _chat_setup(ctx, d)
    return ["train", "model.preset=debug", "model.vocab_size=300", "data.source=chat.jsonl", "data.format=chat",
            "data.chat_template=jinja", "data.tokenizer=tokdir", "data.seq_len=32", "data.global_batch=8",
            "train.steps=2", "checkpoint.enabled=false", "train.progress=false", "train.tensorboard=false",
            "run_dir=X"]


@case("data/chat-template-loop-inspect", "data inspect, the same 10^5 x 10^5 template")
def _(ctx, d):
    _chat_setup(ctx, d)
    return ["data", "inspect", "data.source=chat.jsonl", "data.format=chat", "data.chat_template=jinja",
            "data.tokenizer=tokdir", "data.seq_len=32"]


@case("data/empty-file", "data.source: an empty file")
def _(ctx, d):
    (d / "empty.txt").write_bytes(b"")
    return _text_train(ctx, "empty.txt", "data.format=lines")


# -- generate / eval


def _capped(ctx, d, res):
    rows = []
    for line in res.stdout.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    rows = [r for r in rows if isinstance(r, dict) and "tokens" in r]
    if not rows:
        return "no --json completion on stdout"
    n = max(len(r["tokens"]) for r in rows)
    return None if n <= 256 else f"{n} tokens from a 256-position model"


@case("gen/max-new-tokens-1e9", "generate --max-new-tokens 1000000000: capped by the context, exit 0", "ok", _capped)
def _(ctx, d):
    ctx.copy_run(d / "R")
    return ["generate", "R", "--prompt", "hi", "--max-new-tokens", "1000000000", "--json"]


@case("gen/max-new-tokens-0", "generate --max-new-tokens 0")
def _(ctx, d):
    ctx.copy_run(d / "R")
    return ["generate", "R", "--prompt", "hi", "--max-new-tokens", "0"]


def _eval_tokens(ctx, d, res):
    lines = res.stdout.strip().splitlines()
    if not lines:
        return "no output"
    try:
        out = json.loads(lines[-1])
    except json.JSONDecodeError:
        return f"last stdout line is not JSON: {lines[-1][:100]}"
    return None if out.get("tokens") == 8 * 16 else f"tokens={out.get('tokens')}, expected 128 (overrides ignored?)"


@case("eval/overrides-after-options", "eval R --data synthetic --batch 8 data.seq_len=16 --max-batches 1 "
      "data.packing=concat: exit 0, 128 tokens", "ok", _eval_tokens)
def _(ctx, d):
    ctx.copy_run(d / "R")
    return ["eval", "R", "--data", "synthetic", "--batch", "8", "data.seq_len=16", "--max-batches", "1",
            "data.packing=concat"]


# -- signals


def _stepping(run: Path, n: int) -> Callable[[], bool]:
    def cond() -> bool:
        try:
            return sum(1 for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x) >= n
        except OSError:
            return False
    return cond


@custom_case("signal/sigint-twice", "SIGINT twice (Ctrl-C, Ctrl-C) during training: exit 130, one line, no traceback")
def _(ctx, d):
    w = ctx.watch(train_args(ctx, "R", steps=100000, every=1), d)
    if not w.wait_for(lambda: (d / "R" / "checkpoints" / "2").is_dir(), ctx.timeout):
        res = w.result() if w.killed else w.finish()
        return Outcome("unbounded" if w.killed else "setup_error",
                       w.killed or f"training ended (exit {res.rc}) before checkpoint 2", res)
    before = len(Path(w.err_path).read_bytes())
    w.signal(signal.SIGINT, group=True)
    time.sleep(0.05)
    w.signal(signal.SIGINT, group=True)
    t_sig = time.monotonic()
    res = w.finish()
    after = [x for x in res.stderr.encode()[before:].decode("utf-8", "replace").splitlines() if x.strip()]

    def check(r: Result) -> str | None:
        if not after or "interrupted" not in after[-1]:
            return f"last stderr line after the signals: {after[-1][:200] if after else '(none)'}"
        if len(after) > 1:
            return f"{len(after)} stderr lines after the signals"
        return None

    out = judge(res, "ok", rc=130, check=check)
    if out.status == "silent_wrong":  # a message problem, not a wrong result
        out.status = "failed"
    if out.status == "clean":
        out.note = f"exit 130 {time.monotonic() - t_sig:.1f} s after the signals: {after[-1][:120]}"
    return out


@custom_case("signal/sigterm-train", "SIGTERM during training: exit 0 with a checkpoint saved")
def _(ctx, d):
    run = d / "R"
    w = ctx.watch(train_args(ctx, "R", steps=100000, every=100000), d)
    if not w.wait_for(_stepping(run, 3), ctx.timeout):
        res = w.result() if w.killed else w.finish()
        return Outcome("unbounded" if w.killed else "setup_error",
                       w.killed or f"training ended (exit {res.rc}) before step 3", res)
    w.signal(signal.SIGTERM)
    res = w.finish()

    def check(r: Result) -> str | None:
        steps = [p for p in (run / "checkpoints").glob("*") if p.name.isdigit()] if (run / "checkpoints").is_dir() \
            else []
        if not steps:
            return "exit 0 but no checkpoint saved"
        return metrics_problem(run)

    out = judge(res, "ok", rc=0, check=check)
    if out.status == "clean":
        steps = sorted(int(p.name) for p in (run / "checkpoints").glob("*") if p.name.isdigit())
        out.note = f"exit 0, checkpoint at step {steps[-1]}"
    return out


@custom_case("signal/sigterm-convert", "SIGTERM during convert; the next convert into the same parent removes "
             "the stale .DST.tmp-* folder")
def _(ctx, d):
    src = ctx.fx("big_hf")
    (d / "dst").mkdir()
    tmp_glob = ".model.gguf.tmp-*"
    w = ctx.watch(["convert", str(src), "dst/model.gguf", "--to", "gguf", "--gguf-type", "q8_0"], d, tag="killed")
    seen = w.wait_for(lambda: any((d / "dst").glob(tmp_glob)), ctx.timeout, every=0.005)
    if not seen:
        res = w.result() if w.killed else w.finish()
        return Outcome("unbounded" if w.killed else "setup_error",
                       w.killed or f"convert ended (exit {res.rc}) before its temporary was seen", res)
    time.sleep(0.1)
    w.signal(signal.SIGTERM)
    killed = w.finish()
    if killed.rc == 0:
        return Outcome("setup_error", "the convert finished before SIGTERM landed", killed)
    stale = sorted(p.name for p in (d / "dst").glob(tmp_glob))
    if "Traceback" in killed.stderr:
        return Outcome("traceback", "the SIGTERM'd convert printed a traceback", killed)
    res = ctx.watch(["convert", str(ctx.fx("hf")), "dst/model.gguf", "--to", "gguf"], d).finish()

    def check(r: Result) -> str | None:
        left = sorted(p.name for p in (d / "dst").glob(tmp_glob))
        if left:
            return f"stale temporaries left: {left}"
        if not (d / "dst" / "model.gguf").exists():
            return "dst/model.gguf not written"
        return None

    out = judge(res, "ok", rc=0, check=check)
    if out.status == "clean":
        out.note = (f"killed convert exit {killed.rc}, {len(stale)} stale temporar{'y' if len(stale) == 1 else 'ies'}"
                    f" left, removed by the next convert" if stale else
                    f"killed convert exit {killed.rc} left no temporary; next convert exit 0")
    return out


# ---- the sweep ------------------------------------------------------------------------------------


def run_case(ctx: Ctx, c: Case) -> Outcome:
    d = ctx.root / "cases" / c.name.replace("/", "__")
    d.mkdir(parents=True)
    try:
        if c.custom is not None:
            return c.custom(ctx, d)
        args = c.setup(ctx, d)
    except Skip as e:
        return Outcome("skipped", str(e))
    except SetupError as e:
        return Outcome("setup_error", str(e))
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        return Outcome("setup_error", f"{type(e).__name__}: {e}{where}"[:500])
    res = ctx.watch(args, d).finish()
    check = (lambda r: c.check(ctx, d, r)) if c.check else None
    out = judge(res, c.expect, c.rc, check)
    if out.status == "clean" and c.quote:
        said = next((x.strip() for x in res.output.splitlines() if c.quote in x), None)
        if said:
            out.note = f"{out.note}: {said[:200]}"
    return out


def tail(text: str, n: int = 3, width: int = 300) -> list[str]:
    lines = [x for x in text.splitlines() if x.strip()]
    return [x if len(x) <= width else x[:width] + f"... [{len(x):,} chars]" for x in lines[-n:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="run the cases whose name contains SUBSTRING (repeatable: any of them)")
    ap.add_argument("--timeout", type=float, default=120.0, help="wall-clock limit per command, s (default 120)")
    ap.add_argument("--rss-gib", type=float, default=4.0, help="resident memory limit per command tree (default 4)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (printed) for inspection")
    ap.add_argument("--json", metavar="PATH", help="also write the summary to PATH")
    args = ap.parse_args()

    cases = [c for c in CASES if not args.only or any(s in c.name for s in args.only)]
    if args.list:
        for c in cases:
            print(f"{c.name:36} {c.what}")
        return 0
    if not cases:
        print(f"no case matches {args.only}", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="hostile_sweep-"))
    ctx = Ctx(root, args.timeout, int(args.rss_gib * 2**30))
    print(f"hostile sweep: {len(cases)} cases in {root} (timeout {args.timeout:.0f} s, rss {args.rss_gib:g} GiB)",
          flush=True)
    t0 = time.monotonic()
    rows = []
    try:
        for c in cases:
            try:
                out = run_case(ctx, c)
            except Exception as e:  # the sweep itself must not crash on one case
                out = Outcome("setup_error", f"sweep error: {type(e).__name__}: {e}"[:500])
            r = out.result
            row = {"name": c.name, "status": out.status, "rc": r.rc if r else None,
                   "wall_s": round(r.wall, 1) if r else None,
                   "peak_rss_mib": round(r.peak / 2**20) if r else None, "note": out.note,
                   "stderr_tail": tail(r.stderr) if r else []}
            rows.append(row)
            last = row["stderr_tail"][-1] if row["stderr_tail"] else ""
            detail = out.note if out.status != "clean" or not last else f"{out.note} | {last}"
            print(f"{out.status:12} {c.name:36} rc={row['rc']!s:>4} {row['wall_s'] or 0:6.1f}s "
                  f"{row['peak_rss_mib'] or 0:5} MiB  {detail[:220]}", flush=True)
            if out.status != "clean" and last and last not in detail:
                for line in row["stderr_tail"]:
                    print(f"{'':14}| {line[:220]}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    tried = [x for x in rows if x["status"] not in ("skipped",)]
    summary = {"tried": len(tried), **{s: sum(x["status"] == s for x in rows) for s in STATUSES},
               "seconds": round(time.monotonic() - t0), "cases": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0 if all(x["status"] == "clean" for x in tried) else 1


if __name__ == "__main__":
    sys.exit(main())
