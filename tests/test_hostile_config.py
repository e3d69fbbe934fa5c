"""Hostile or broken input to the config loader and the data readers ends in one short line.

Each case once cost minutes, gigabytes or a traceback: a few hundred bytes of YAML aliases that
expand to 10^9 values (and an error quoting them all), binary or 100,000-deep YAML, nan/inf and
negative seeds accepted, an empty run_dir, a chat template looping 10^10 times, a 50 MB JSONL line.
The bounds are checked by what is raised, never by timing: a test that materialized the 10^9-value
bomb or ran the 10^10-step template would not finish.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import typing

import numpy as np
import pytest

from jaxllama.config import Config, load_config
from jaxllama.data.chat_data import BadRecord, ChatEncoder, encode_line, encoder_for
from jaxllama.data.chat_format import render_jinja
from jaxllama.data.corpus import BadRecords, chat_records
from jaxllama.data.preference import preference_encoder
from jaxllama.errors import ConfigError

SHORT = 600  # an error message is one line of at most this many characters (a quoted value: 200)


def one_short_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= SHORT, msg[:1000]
    return msg


def alias_bomb(levels: int, width: int = 9, indent: str = "") -> str:
    """``a: &a [x, ...]``, ``b: &b [*a, *a, ...]``, ...: width**levels strings in a few hundred bytes."""
    lines = [f"{indent}l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# -- 1. YAML alias bombs and bounded messages ----------------------------------------------------


@pytest.mark.parametrize("levels", [6, 10])  # 9^6 = 531,441 values; 9^10 = 3.5e9
def test_alias_bomb_in_a_config_file_is_refused_naming_the_file_and_key(tmp_path, levels):
    f = tmp_path / "bomb.yaml"
    f.write_text("model:\n  dim:\n" + alias_bomb(levels, indent="    "))
    assert f.stat().st_size < 600
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = one_short_line(e)
    assert "bomb.yaml" in msg and "model.dim" in msg and "aliases" in msg


def test_alias_bomb_in_an_override_is_refused_naming_the_key():
    names = ["a"] + [f"b{i}" for i in range(9)]  # &a [x * 9], &b0 [*a * 9], &b1 [*b0 * 9], ...: 9^10 strings
    flow = "[&a [" + ", ".join(["x"] * 9) + "], " + ", ".join(
        f"&{name} [" + ", ".join([f"*{prev}"] * 9) + "]" for prev, name in zip(names, names[1:])) + "]"
    assert len(flow) < 600
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.lora.targets={flow}", "train.lora.rank=4"])
    assert one_short_line(e).startswith("train.lora.targets: holds more than")


def test_a_recursive_alias_is_refused(tmp_path):
    f = tmp_path / "loop.yaml"
    f.write_text("mesh:\n  rules: &r [*r]\n")
    with pytest.raises(ConfigError, match="loop.yaml.*recursive alias") as e:
        load_config(f)
    one_short_line(e)
    with pytest.raises(ConfigError, match="model.dim: .*recursive alias"):
        load_config(None, ["model.dim=&a [*a]"])


def test_shared_anchors_within_bounds_still_work(tmp_path):
    f = tmp_path / "anchors.yaml"
    f.write_text("train:\n  lora:\n    rank: 4\n    targets: &t [q_proj, v_proj]\n"
                 "mesh:\n  rules: [[batch, [data, fsdp]], [embed, fsdp], [heads, tensor]]\n")
    assert load_config(f).train.lora.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override, key", [
    ("model.dim=" + "x" * 100_000, "model.dim: expected an integer"),
    ("optim.schedule=" + "y" * 100_000, "optim.schedule:"),
    ("train.steps=" + "9" * 5000, "train.steps: expected an integer"),  # past Python's int-string limit
    ("z" * 100_000 + "=1", "unknown config key zzz"),
    ("train.init_from=" + "a" * 100_000, "train.init_from: aaa"),  # a name too long for the OS
    ("mesh.rules=[[" + "q" * 100_000 + ", null]]", "mesh.rules[0]:"),
    ("train.lora.targets=[" + "w" * 100_000 + "]", "train.lora.targets:"),
    ("train.lora.rank=4 " * 10_000, "train.lora.rank:"),
])
def test_every_error_message_is_short(override, key):
    extra = ["train.lora.rank=4"] if override.startswith("train.lora.targets") else []
    with pytest.raises(ConfigError) as e:
        load_config(None, [override, *extra])
    assert one_short_line(e).startswith(key)


# -- 2. binary and deep YAML ---------------------------------------------------------------------


@pytest.mark.parametrize("name, data, words", [
    ("random.yaml", bytes(random.Random(0).randrange(256) for _ in range(4096)), "random.yaml line"),
    ("nul.yaml", b"model:\n  preset: ti\x00ny\n", "nul.yaml line 2: a NUL byte"),
    ("latin1.yaml", b"model:\n  preset: caf\xe9\n", "latin1.yaml line 2: not UTF-8"),
    ("control.yaml", b"model:\n  preset: \x07tiny\n", "control.yaml line 2: invalid YAML"),
])
def test_binary_yaml_is_one_line_naming_the_file(tmp_path, name, data, words):
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert words in one_short_line(e)


def test_deep_yaml_is_one_line_not_a_recursion_error(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("model:\n  dim: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "deep.yaml line 2: invalid YAML (nested deeper than" in one_short_line(e)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["mesh.rules=" + "[" * 100_000 + "]" * 100_000])
    assert one_short_line(e).startswith("mesh.rules: nested deeper than")


def test_a_huge_config_file_is_refused_unread(tmp_path):
    f = tmp_path / "huge.yaml"
    f.write_text("model:\n  preset: tiny\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="huge.yaml: .* bytes; a config is at most") as e:
        load_config(f)
    one_short_line(e)


# -- 3. values that must be finite, seeds, run_dir -----------------------------------------------


def _float_keys(obj=None, prefix: str = "") -> list[str]:
    obj = obj or Config()
    out = []
    for f in dataclasses.fields(obj):
        hint = typing.get_type_hints(type(obj))[f.name]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _float_keys(value, f"{prefix}{f.name}.")
        elif hint is float or float in typing.get_args(hint):
            out.append(f"{prefix}{f.name}")
    return out


def test_every_float_key_refuses_nan_and_inf():
    keys = _float_keys()
    assert {"optim.lr", "optim.clip_norm", "train.dpo.beta", "model.rope_theta", "train.peak_flops"} <= set(keys)
    for key in keys:
        for value in ("nan", ".nan", "inf", "-.inf", "1e400"):
            with pytest.raises(ConfigError) as e:
                load_config(None, [f"{key}={value}"])
            assert one_short_line(e).startswith(f"{key}: must be a finite number"), (key, value)


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**70)])
def test_seeds_outside_32_bits_are_refused(seed):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.seed={seed}"])
    assert one_short_line(e).startswith("train.seed:")
    assert load_config(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


@pytest.mark.parametrize("value", ["", "  ", "''"])
def test_an_empty_run_dir_is_refused(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"run_dir={value}"])
    assert one_short_line(e).startswith("run_dir: empty")


# -- 4. chat templates with a budget -------------------------------------------------------------


class FakeTok:
    """What rendering a template asks of a tokenizer (it fails before anything is tokenized)."""

    bos_id = eos_id = None

    def __init__(self, template: str):
        self.chat_template = template

    def special_ids(self) -> dict:
        return {}


MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     "chat template line 1: rendering stopped after"),
    ("{% set s %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endset %}",
     "chat template line 1: rendering stopped after"),  # no output to count: the loop steps are
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
     "chat template: rendering stopped after"),  # 2^60 calls, no loop
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "chat template: rendering stopped at"),
    ("{{ 'x' * 10000000000 }}", "chat template: '*' would make a value"),
    ("{{ 7 ** 100000000 }}", "too large a number"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses too deeply"),
    ("{{ 1 / 0 }}", "chat template: cannot render it (ZeroDivisionError"),
    ("{% for %}", "chat template line 1: not valid Jinja"),
])
def test_chat_templates_render_within_a_budget(template, words):
    with pytest.raises(ConfigError) as e:
        render_jinja(template, MESSAGES, FakeTok(template))
    assert words in one_short_line(e)


def test_a_runaway_template_is_a_bad_record_naming_file_line(tmp_path):
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    enc = ChatEncoder(FakeTok(loop), "chat", template="jinja")
    with pytest.raises(ConfigError) as e:
        list(chat_records(str(f), enc, BadRecords()))
    assert one_short_line(e).startswith(f"{f}:1: chat template line 1: rendering stopped after")


# -- 5. records larger than data.max_record_bytes ------------------------------------------------


def test_a_50mb_chat_line_is_a_bad_record_before_it_is_parsed(tmp_path):
    f = tmp_path / "big.jsonl"
    big = json.dumps({"messages": [{"role": "user", "content": "q" * (17 << 20)},
                                   {"role": "assistant", "content": "a"}]})
    f.write_text(json.dumps({"messages": MESSAGES}) + "\n" + big + "\n")
    enc = ChatEncoder(FakeTok("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
                              "{% endfor %}"), "chat", template="jinja")
    assert enc.max_record_bytes == 16 << 20  # the default, as data.max_record_bytes
    with pytest.raises(BadRecord, match=r"^at least \d+ bytes, larger than data.max_record_bytes=16777216"):
        encode_line(enc, big)
    seen: list = []
    bad = BadRecords(skip=True)
    list(chat_records(str(f), _Recorder(enc, seen), bad))  # the big line never reaches the encoder
    assert bad.count == 1 and bad.last.startswith(f"{f}:2: 17825") and len(seen) == 1  # the reader's bound: the
    # line is measured in 1 MiB chunks and never held whole
    with pytest.raises(ConfigError) as e:
        list(chat_records(str(f), _Recorder(enc, []), BadRecords()))
    assert one_short_line(e).startswith(f"{f}:2: 17825") and "data.max_record_bytes=16777216" in str(e.value)


class _Recorder:
    """An encoder that records what it is asked to encode (so a refused line is never parsed)."""

    def __init__(self, enc: ChatEncoder, seen: list):
        self.max_record_bytes, self.seen = enc.max_record_bytes, seen

    def __call__(self, record):
        self.seen.append(record)
        return np.zeros(2, np.int32), np.ones(2, np.uint8)


def test_max_record_bytes_is_a_config_key_the_encoders_follow(fake_tok):
    cfg = load_config(None, ["data.max_record_bytes=100", "data.format=chat", "data.source=x.jsonl"])
    assert cfg.data.max_record_bytes == 100
    enc = encoder_for(cfg.data, fake_tok)
    line = json.dumps({"messages": MESSAGES, "pad": "p" * 100})
    with pytest.raises(BadRecord, match="larger than data.max_record_bytes=100"):
        encode_line(enc, line)
    cfg.data.format = "preference"
    with pytest.raises(BadRecord, match="larger than data.max_record_bytes=100"):
        encode_line(preference_encoder(cfg.data, fake_tok), line)
    with pytest.raises(ConfigError, match="data.max_record_bytes: must be positive"):
        load_config(None, ["data.max_record_bytes=0"])


@pytest.fixture
def fake_tok():
    """A tokenizer that can resolve the llama2 format (no special tokens needed) and is never asked to encode."""
    tok = FakeTok(None)
    tok.add_bos = True
    return tok


def test_plain_jsonl_and_tfrecord_records_over_the_bound_are_bad_records(tmp_path):
    import tensorflow as tf

    from jaxllama.data.documents import _file_documents

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ("short", "L" * 500, "fine")) + "\n")
    rec = tmp_path / "docs.tfrecord"
    with tf.io.TFRecordWriter(str(rec)) as w:
        for t in ("short", "T" * 500):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))}))
            w.write(ex.SerializeToString())
    for path, where in ((jsonl, f"{jsonl}:2"), (rec, f"{rec}:record 2")):
        bad = BadRecords(skip=True)
        docs = [x.decode() for x in _file_documents([str(path)], "auto", "text", bad, False, max_bytes=200)
                .as_numpy_iterator()]
        assert "L" * 500 not in docs and "T" * 500 not in docs and "short" in docs
        assert bad.count == 1 and bad.last.startswith(f"{where}: ") and "data.max_record_bytes=200" in bad.last
        with pytest.raises(Exception, match="max_record_bytes=200"):  # the error surfaces through tf.data
            list(_file_documents([str(path)], "auto", "text", BadRecords(), False, max_bytes=200).as_numpy_iterator())


def test_a_huge_line_is_measured_without_being_held_whole(tmp_path):
    """50 MB on one line, a 1 MiB bound: the reader's largest read is about the bound, and the next line is read."""
    from jaxllama.data.corpus import bounded_lines

    f = tmp_path / "big.jsonl"
    f.write_bytes(b"x" * (50 << 20) + b"\n" + b'{"text": "ok"}\n')
    sizes = []

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def readline(self, n=-1):
            out = self.fh.readline(n)
            sizes.append(len(out))
            return out

    with open(f, "rb") as fh:
        lines = list(bounded_lines(Counting(fh), 1 << 20))
    assert lines == [(1, None, (50 << 20) + 1), (2, b'{"text": "ok"}\n', 15)]
    assert max(sizes) <= (1 << 20) + 1


# -- the command line: one line, exit 2, no traceback (two subprocesses in all) ------------------


@pytest.mark.parametrize("name, text", [
    ("bomb.yaml", "model:\n  dim:\n" + alias_bomb(10, indent="    ")),
    ("deep.yaml", "model:\n  dim: " + "[" * 100_000 + "]" * 100_000 + "\n"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, "-m", "jaxllama.cli", "train", "--config", str(f)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) <= SHORT + 20 and name in lines[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
