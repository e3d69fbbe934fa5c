"""Conversion readers against hostile or broken inputs: every lie a checkpoint can tell about itself
(safetensors offsets, GGUF counts, config values, Meta shards) is one line naming the file and the
key or tensor, found before anything is allocated; nothing half-written is left, and temporaries of
killed processes are removed by the next run.

The inputs are tiny models written by our own exporters, then damaged by hand.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from helpers import random_params
from jaxllama.cli import main
from jaxllama.config import load_config
from jaxllama.convert import convert, load_model
from jaxllama.convert.common import ParamsSource
from jaxllama.convert.hf import write_hf
from jaxllama.errors import ConfigError
from jaxllama.model.llama import Arch

ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def tiny_hf(folder: Path, *overrides: str) -> Path:
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", *overrides]).model
    write_hf(ParamsSource(random_params(Arch.from_config(m)), m), folder, shard_size=10**9)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI in-process: it must exit ``code`` with exactly one line on stderr."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxllama.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


# ---- 1. safetensors headers ----------------------------------------------------------------------------


def rewrite_header(file: Path, edit) -> None:
    """Apply ``edit(header)`` to a safetensors file's JSON header, keeping its data bytes."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _set(name: str, **entry):
    return lambda h: h[name].update(entry)


def _alias_norm_onto_embedding(h: dict) -> None:
    start = h["model.embed_tokens.weight"]["data_offsets"][0]
    h["model.norm.weight"]["data_offsets"] = [start, start + 256]  # the right length, another tensor's bytes


SAFETENSORS = {
    # data_offsets before the data section: the header's own JSON bytes became the weights (exit 0)
    "negative_offsets": (_set("model.norm.weight", data_offsets=[-256, 0]), "data_offsets [-256, 0]"),
    # numpy's "can only specify one unknown dimension" traceback
    "negative_dims": (_set("model.norm.weight", shape=[-1, -64]), "shape [-1, -64]"),
    # int(64.5) == 64: read as if it were a valid shape
    "fractional_dim": (_set("model.norm.weight", shape=[64.5]), "shape [64.5]"),
    # two tensors on the same bytes
    "overlap": (_alias_norm_onto_embedding, "overlap"),
    # guards that already held before these fixes (kept so they stay):
    "header_longer_than_file": ("length", "header of"),
    "header_not_json": ("json", "corrupt safetensors header"),
}


@pytest.mark.parametrize("how", SAFETENSORS)
def test_safetensors_header_is_checked_on_open(tmp_path, capsys, how):
    folder = tiny_hf(tmp_path / "hf")
    f = folder / "model.safetensors"
    edit, message = SAFETENSORS[how]
    if edit == "length":
        f.write_bytes(struct.pack("<Q", f.stat().st_size) + f.read_bytes()[8:])
    elif edit == "json":
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        f.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n:])
    else:
        rewrite_header(f, edit)
    before = set(tmp_path.iterdir())
    err = one_line_error(capsys, ["convert", str(folder), str(tmp_path / "out"), "--to", "hf"])
    assert "model.safetensors" in err and message in err, err
    if how not in ("header_longer_than_file", "header_not_json", "overlap"):
        assert "model.norm.weight" in err, err
    assert set(tmp_path.iterdir()) == before  # no destination, no temporary


def test_safetensors_negative_offsets_via_the_real_cli(tmp_path):
    """The installed command: exit 2, one line, no traceback (a subprocess, as a user runs it)."""
    folder = tiny_hf(tmp_path / "hf")
    rewrite_header(folder / "model.safetensors", _set("model.norm.weight", data_offsets=[-256, 0]))
    r = cli("convert", str(folder), str(tmp_path / "out"), "--to", "jaxllama")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "model.safetensors" in lines[0] and "model.norm.weight" in lines[0] and "data_offsets" in lines[0]
    assert not (tmp_path / "out").exists()


# ---- 3. config.json values -----------------------------------------------------------------------------


HF_CONFIG = {
    "float_layers": (dict(num_hidden_layers=2.5), "num_hidden_layers=2.5 is not a positive integer"),
    "zero_heads": (dict(num_attention_heads=0), "num_attention_heads=0 is not a positive integer"),
    "zero_kv_heads": (dict(num_key_value_heads=0), "num_key_value_heads=0 is not a positive integer"),
    "rope_parameters_string": (dict(rope_parameters="x"), 'rope_parameters="x" is not an object'),
    "rope_scaling_string": (dict(rope_scaling="x"), 'rope_scaling="x" is not an object'),
    # bool("false") is True: the model would silently become tied
    "tie_as_string": (dict(tie_word_embeddings="false"), 'tie_word_embeddings="false" is not true or false'),
    "negative_eps": (dict(rms_norm_eps=-1e-5), "rms_norm_eps=-1e-05 is not a positive number"),
}


@pytest.mark.parametrize("how", HF_CONFIG)
def test_hf_config_values_are_checked(tmp_path, capsys, how):
    folder = tiny_hf(tmp_path / "hf")
    changes, message = HF_CONFIG[how]
    edit_json(folder / "config.json", **changes)
    err = one_line_error(capsys, ["convert", str(folder), str(tmp_path / "out"), "--to", "hf"])
    assert f"{folder / 'config.json'}: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_hf_layer_count_is_checked_against_the_weights_before_allocating(tmp_path):
    """num_hidden_layers=10**9 used to preallocate a [10**9, 64, 64] stack (14.9 TiB) and die of MemoryError."""
    folder = tiny_hf(tmp_path / "hf")
    edit_json(folder / "config.json", num_hidden_layers=10**9)
    with pytest.raises(ConfigError) as e:
        load_model(str(folder))
    assert str(e.value) == (f"{folder / 'config.json'}: num_hidden_layers=1000000000, but model.safetensors has "
                            f"2 layers (tensor model.layers.2.self_attn.q_proj.weight not found)")


def test_hf_unexpected_tensors_are_refused(tmp_path, capsys):
    """A bias the config does not describe would be dropped silently; a layer beyond the count too."""
    from jaxllama.convert.safetensors_io import SafetensorsFile, write_safetensors

    folder = tiny_hf(tmp_path / "hf")
    f = folder / "model.safetensors"
    sf = SafetensorsFile(f)
    tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
    del sf
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    write_safetensors(f, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)
    err = one_line_error(capsys, ["convert", str(folder), str(tmp_path / "out"), "--to", "hf"])
    assert f"{f}: model.layers.0.self_attn.q_proj.bias: unexpected tensor" in err, err


# ---- 2./3. GGUF metadata -------------------------------------------------------------------------------


def tiny_gguf(tmp_path: Path, *overrides: str) -> Path:
    convert(str(tiny_hf(tmp_path / "hf", *overrides)), str(tmp_path / "m.gguf"), "gguf")
    return tmp_path / "m.gguf"


def rewrite_gguf(src: Path, dst: Path, fields: dict | None = None, extra: dict | None = None) -> None:
    """Copy a GGUF with the gguf package, replacing metadata (``{key: (value, GGUFValueType)}``) and
    adding tensors."""
    fields = fields or {}
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in fields:
            w.add_key_value(name, *fields[name])
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
GGUF_BAD = {
    # wrote a 0-layer model (exit 0)
    "zero_blocks": (dict(fields={"llama.block_count": (0, U32)}), "llama.block_count=0 is not a positive integer"),
    # int(2.5) == 2: believed
    "float_blocks": (dict(fields={"llama.block_count": (2.5, F32)}), "llama.block_count=2.5 is not a positive integer"),
    "zero_heads": (dict(fields={"llama.attention.head_count": (0, U32)}),
                   "llama.attention.head_count=0 is not a positive integer"),
    "more_blocks_than_tensors": (dict(fields={"llama.block_count": (3, U32)}), "llama.block_count=3, but the file "
                                 "has 2 layers (tensor blk.2.attn_q.weight not found)"),
    # silently ignored
    "extra_tensor": (dict(extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)}),
                     "blk.0.attn_q.bias: unexpected tensor"),
}


@pytest.mark.parametrize("how", GGUF_BAD)
def test_gguf_metadata_is_checked_against_its_tensors(tmp_path, capsys, how):
    edit, message = GGUF_BAD[how]
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(tiny_gguf(tmp_path), bad, **edit)
    before = set(tmp_path.iterdir())
    err = one_line_error(capsys, ["convert", str(bad), str(tmp_path / "out"), "--to", "hf"])
    assert f"{bad}: {message}" in err, err
    assert set(tmp_path.iterdir()) == before


def test_gguf_tensor_count_one_short_is_not_read_as_a_tied_model(tmp_path, capsys):
    """The header's tensor count is one less: output.weight (the last) went unlisted and the model was
    written with a tied head -- and every tensor read from the shifted data start."""
    bad = tmp_path / "bad.gguf"
    raw = bytearray(tiny_gguf(tmp_path).read_bytes())
    (n,) = struct.unpack("<Q", raw[8:16])
    raw[8:16] = struct.pack("<Q", n - 1)
    bad.write_bytes(bytes(raw))
    err = one_line_error(capsys, ["convert", str(bad), str(tmp_path / "out"), "--to", "hf"])
    assert str(bad) in err and f"the header's tensor count ({n - 1}) is short" in err, err
    assert not (tmp_path / "out").exists()


def test_gguf_huge_block_count_is_refused_at_once_via_the_real_cli(tmp_path):
    """block_count=10**9 planned a billion layers (a hang, memory growing); now one line, at once."""
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(tiny_gguf(tmp_path), bad, fields={"llama.block_count": (10**9, U32)})
    r = cli("convert", str(bad), str(tmp_path / "out"), "--to", "hf", timeout=90)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"jaxllama: error: {bad}: llama.block_count=1000000000, but the file has 2 layers "
        f"(tensor blk.2.attn_q.weight not found)"]


# ---- 3. Meta params.json and shards --------------------------------------------------------------------


def tiny_meta(tmp_path: Path, shards: int = 2) -> Path:
    convert(str(tiny_hf(tmp_path / "hf")), str(tmp_path / "meta"), "meta", meta_shards=shards)
    return tmp_path / "meta"


META_PARAMS = {
    "zero_heads": (dict(n_heads=0), "n_heads=0 is not a positive integer"),
    "zero_multiple_of": (dict(multiple_of=0), "multiple_of=0 is not a positive integer"),
    "float_layers": (dict(n_layers=2.5), "n_layers=2.5 is not a positive integer"),
    "string_dim": (dict(dim="64"), 'dim="64" is not a positive integer'),
}


@pytest.mark.parametrize("how", META_PARAMS)
def test_meta_params_values_are_checked(tmp_path, capsys, how):
    folder = tiny_meta(tmp_path)
    changes, message = META_PARAMS[how]
    edit_json(folder / "params.json", **changes)
    err = one_line_error(capsys, ["convert", str(folder), str(tmp_path / "out"), "--to", "hf"])
    assert f"{folder / 'params.json'}: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_meta_shards_that_do_not_concatenate(tmp_path, capsys):
    """consolidated.01.pth's w1 has other columns than 00's: np.concatenate's traceback before."""
    folder = tiny_meta(tmp_path)
    shard = folder / "consolidated.01.pth"
    state = torch.load(shard, weights_only=True)
    w1 = state["layers.0.feed_forward.w1.weight"]
    state["layers.0.feed_forward.w1.weight"] = w1[:, : w1.shape[1] // 2].clone()
    torch.save(state, shard)
    err = one_line_error(capsys, ["convert", str(folder), str(tmp_path / "out"), "--to", "hf"])
    assert f"{shard}: layers.0.feed_forward.w1.weight: shape (48, 32) does not concatenate with " \
           f"consolidated.00.pth's (48, 64) along axis 0" in err, err


def test_meta_layer_count_is_checked_before_allocating(tmp_path):
    folder = tiny_meta(tmp_path, shards=1)
    edit_json(folder / "params.json", n_layers=10**9)
    with pytest.raises(ConfigError) as e:
        load_model(str(folder))
    assert str(e.value) == (f"{folder / 'params.json'}: n_layers=1000000000, but consolidated.00.pth has 2 layers "
                            f"(tensor layers.2.attention.wq.weight not found)")


# ---- 4. unwritable destinations ------------------------------------------------------------------------


def test_read_only_destination_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """mkdir in a read-only place raises EROFS (EACCES for a non-root user); the tests run as root, who
    may write anywhere, so the file system's refusal is simulated at os.mkdir."""
    folder = tiny_hf(tmp_path / "hf")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    err = one_line_error(capsys, ["convert", str(folder), str(ro / "out"), "--to", "hf"])
    assert err == f"jaxllama: error: {ro / 'out'}: cannot write in {ro} (Read-only file system)"
    assert list(ro.iterdir()) == []


def test_disk_full_midway_is_one_line_naming_the_destination(tmp_path, capsys, monkeypatch):
    import jaxllama.convert.hf as hf

    folder = tiny_hf(tmp_path / "hf")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hf, "write_safetensors", full)
    err = one_line_error(capsys, ["convert", str(folder), str(tmp_path / "out"), "--to", "hf"], code=1)
    assert err == f"jaxllama: error: {tmp_path / 'out'}: cannot write (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ---- 5. temporaries of killed processes ----------------------------------------------------------------


KILLED_MIDWAY = """
import os, signal, sys
import jaxllama.convert.hf as hf
from jaxllama.convert import convert

def die(*args, **kwargs):  # the default SIGTERM action: no finally, no atexit
    os.kill(os.getpid(), signal.SIGTERM)

hf.write_safetensors = die
convert(sys.argv[1], sys.argv[2], "hf")
"""


def test_temporaries_of_a_killed_convert_are_removed_by_the_next_run(tmp_path, monkeypatch):
    """A convert of a GGUF killed while writing leaves DST's hidden temporary and the GGUF's rebuilt
    tokenizer folder; the next conversion (or any GGUF open) removes both, since their owner is dead."""
    from test_convert_gguf import hf_with_tokenizer

    hf_with_tokenizer(tmp_path / "hf", "spm")
    convert(str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "gguf")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out" / "model"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(tmp_path / "m.gguf"), str(out)],
                       env=dict(ENV, TMPDIR=str(tmp)), capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGTERM, r.stderr
    assert [p.name.startswith(".model.tmp-") for p in out.parent.iterdir()] == [True]  # leaked ...
    assert [p.name.startswith("jaxllama-gguf-tokenizer-") for p in tmp.iterdir()] == [True]

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    convert(str(tmp_path / "m.gguf"), str(out), "hf")  # ... the same destination folder, a later run
    assert [p.name for p in out.parent.iterdir()] == ["model"]
    assert list(tmp.iterdir()) == []  # the dead run's tokenizer folder is gone, and this run's was removed on close


def test_sweeping_spares_what_it_cannot_prove_dead(tmp_path):
    """Only folders whose record names a dead process on this machine go: a live owner's, another
    machine's, and an unrecorded folder stay; a reused pid (other start time) counts as dead."""
    from jaxllama.convert.tempdirs import OWNER, _machine, make_owned_dir, sweep_stale

    live = make_owned_dir(".a.tmp-", tmp_path)
    elsewhere = make_owned_dir(".b.tmp-", tmp_path)
    (elsewhere / OWNER).write_text(json.dumps({"pid": 1, "start": None, **_machine(), "host": "another-host"}))
    unrecorded = tmp_path / ".c.tmp-xyz"
    unrecorded.mkdir()
    reused = make_owned_dir(".d.tmp-", tmp_path)
    (reused / OWNER).write_text(json.dumps({"pid": os.getpid(), "start": "-1", **_machine()}))
    assert sweep_stale(tmp_path, ".*.tmp-*") == [reused]
    assert sorted(tmp_path.iterdir()) == sorted([live, elsewhere, unrecorded])
