"""The `jaxllama` command as a user runs it: exit codes, one-line errors, info, help."""

import os
import subprocess
import sys

import pytest

from jaxllama import cli
from jaxllama.errors import RunError

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TF_CPP_MIN_LOG_LEVEL="3")


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "jaxllama.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


@pytest.mark.parametrize("args, word", [
    (["train", "train.stepz=5"], "train.stepz"),
    (["train", "model.preset=llama9-1t"], "model.preset"),
    (["train", "mesh.tensor=3", "mesh.data=1", "mesh.fsdp=1"], "mesh"),
    (["train", "train.steps=banana"], "train.steps"),
    (["train", "data.seq_len=-4"], "seq_len"),
    (["train", "data.global_batch=7", "mesh.data=8"], "global_batch"),
    (["train", "--config", "/nonexistent/cfg.yaml"], "config"),
    (["train", "mesh.tensor=8", "mesh.fsdp=1"], "kv_heads=4 over tensor=8"),  # tiny has 4 kv heads
    (["train", "data.seq_len=4096"], "model.max_position"),
    (["train", "model.preset=llama3-70b", "data.seq_len=64", "data.global_batch=8"], "GiB is available"),  # on CPU
    (["train", "--bogus-flag"], "unrecognized"),
    (["fly"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, word):
    p = run(*args)
    out = (p.stdout + p.stderr).strip()
    assert p.returncode == 2, out
    assert len(out.splitlines()) == 1 and "Traceback" not in out and word in out, out


def test_debug_shows_the_traceback():
    p = run("train", "train.stepz=5", "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_runtime_errors_exit_1(monkeypatch, capsys):
    def boom(cfg, **kwargs):
        raise RunError("loss was not finite for 5 steps in a row")

    monkeypatch.setattr("jaxllama.train.loop.train", boom)
    assert cli.main(["train", "train.steps=1"]) == 1
    assert capsys.readouterr().err.strip() == "jaxllama: error: loss was not finite for 5 steps in a row"


def test_info_reports_count_memory_and_flops():
    p = run("info", "model.preset=llama3-8b", "mesh.fsdp=4", "mesh.tensor=2")
    assert p.returncode == 0, p.stderr
    assert "8,030,261,248" in p.stdout and "fsdp=4" in p.stdout and "FLOPs/token" in p.stdout
    # fp32 params split 8 ways: 8.03e9 * 4 bytes / 8 = 3.74 GiB per device
    assert "params 3.7" in p.stdout


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["info", "--help"]])
def test_help(args):
    p = run(*args)
    assert p.returncode == 0 and "usage" in p.stdout


def test_bare_jaxllama_prints_the_verbs(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: jaxllama") and "generate" in err and "compile-check" in err
    assert cli.main(["fly"]) == 2  # an error line names the program once
    assert capsys.readouterr().err.startswith("jaxllama: error: argument verb: invalid choice")


def _train_on_a_terminal(tmp_path, columns: int) -> str:
    """`jaxllama train` with a pseudo-terminal of ``columns`` as stdout and stderr; everything it wrote."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "jaxllama.cli", "train", "model.preset=debug", "data.source=synthetic",
                          "data.seq_len=32", "data.global_batch=8", "train.steps=4", "train.log_every=1",
                          "checkpoint.every=2", "train.tensorboard=false", f"run_dir={tmp_path / str(columns)}"],
                         stdin=slave, stdout=slave, stderr=slave, env={**ENV, "COLUMNS": "", "LINES": ""})
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert p.wait(timeout=120) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_and_messages_on_a_terminal(tmp_path):
    """On a terminal the bar is cleared before a checkpoint message (which once landed inside the
    bar's line: `MFU 36.7%]checkpoint at step 2`); a terminal of width 0 gets plain lines, not nothing."""
    text = _train_on_a_terminal(tmp_path, 100)
    at = text.index("checkpoint at step 2")
    assert text[at - 1] in "\r\n", repr(text[max(0, at - 80):at + 20])
    assert "done: 4 steps" in text
    narrow = _train_on_a_terminal(tmp_path, 0)
    assert "step      4 | loss" in narrow and "done: 4 steps" in narrow
