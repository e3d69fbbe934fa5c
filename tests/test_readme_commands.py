"""Every `jaxllama` command in the READMEs (top level, launch/, benchmarks/) parses as written: its verb and flags exist, and for the
verbs that take a config its file exists and every key=value override is a valid setting.

This is the cheap guard against README drift that CI runs (no command is executed: several need a
pod, a model download or minutes of CPU); `tests/test_cli.py` and the acceptance checks run commands.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from jaxllama.cli import build_parser
from jaxllama.config import load_config
from jaxllama.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_VERBS = ("train", "info", "compile-check")


def readme_commands(path: Path = ROOT / "README.md") -> list[tuple[int, list[str]]]:
    """(line number, argv after `jaxllama`) for each command in the README's bash blocks; continuation
    lines joined, comments and shell operators (`&&`, `|`) cut."""
    out, block, pending, start = [], False, "", 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        text = pending + " " + line.strip() if pending else line.strip()
        start = start if pending else i
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        for part in re.split(r"&&|\|\||;|\|", text):
            words = shlex.split(part, comments=True)
            if words[:1] == ["jaxllama"]:
                out.append((start, words[1:]))
    return out


DOCS = ("README.md", "launch/README.md", "benchmarks/README.md")
COMMANDS = [(f"{doc}:{n}", argv) for doc in DOCS for n, argv in readme_commands(ROOT / doc)]


def test_the_readme_has_commands_for_every_verb():
    verbs = {argv[0] for _, argv in COMMANDS if argv}
    assert {"train", "info", "compile-check", "convert", "tokenizer", "generate", "eval"} <= verbs, verbs


@pytest.mark.parametrize("line, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_readme_command_parses(line, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths in the README are relative to the checkout
    args = build_parser().parse_args(argv)  # unknown verbs/flags raise (one line)
    if argv and argv[0] in CONFIG_VERBS:
        if args.config:
            assert os.path.isfile(args.config), f"{line}: --config {args.config} does not exist"
        try:
            load_config(args.config, args.overrides)  # unknown keys and invalid values raise, naming the key
        except ConfigError as e:  # a placeholder path (path/to/...) is the reader's to fill in
            if not re.search(r"path/to/\S*: no such file", str(e)):
                raise
