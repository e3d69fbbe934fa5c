"""Shared by the serve tests: a small Hugging Face model folder with a real tokenizer, and
``jaxllama serve`` started as a subprocess on a free loopback port (always stopped)."""

from __future__ import annotations

import contextlib
import io
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import sentencepiece as spm

from helpers import random_params
from jaxllama.config import load_config
from jaxllama.convert.common import Extras, ParamsSource
from jaxllama.convert.hf import write_hf
from jaxllama.model.llama import Arch

VOCAB = 300
WORDS = "the quick brown fox jumps over lazy dog hello world test this is a model of text".split()


def make_hf_model(root: Path, vocab: int = VOCAB, seed: int = 0) -> Path:
    """A random debug model as a Hugging Face folder, with a SentencePiece tokenizer of ``vocab`` pieces."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
    tok_dir = root / "tok"
    tok_dir.mkdir(parents=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2)
    (tok_dir / "tokenizer.model").write_bytes(buf.getvalue())
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", f"model.vocab_size={vocab}"]).model
    params = random_params(Arch.from_config(m), seed=seed)
    write_hf(ParamsSource(params, m, Extras(tokenizer_dir=tok_dir, bos_token_id=1, eos_token_id=2)), root / "hf")
    return root / "hf"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    """One CPU device per server process (not the 8 simulated devices of the test process)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_COORDINATOR")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


@contextlib.contextmanager
def running_server(model: Path, *args: str, launch: list[str] | None = None, timeout: float = 180,
                   name: str | None = None) -> Iterator[str]:
    """``jaxllama serve MODEL ARGS`` (under ``launch``, e.g. the local multi-process launcher) until
    /health answers ok; yields the base URL (``http://127.0.0.1:PORT``); stops it at exit."""
    port = free_port()
    cmd = [*(launch or []), sys.executable, "-m", "jaxllama.cli", "serve", str(model), "--port", str(port), *args]
    if name:
        cmd += ["--served-model-name", name]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"jaxllama-serve-{port}.log", "w+")
    proc = subprocess.Popen(cmd, env=server_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"server exited {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not become healthy in time")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
