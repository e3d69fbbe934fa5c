"""Every pair of formats round-trips losslessly in float32: X -> Y -> X gives identical tensors and config."""

import itertools

import numpy as np
import pytest

from helpers import flat_arrays, random_params
from jaxllama.config import load_config
from jaxllama.convert import convert, load_model
from jaxllama.convert.common import ParamsSource
from jaxllama.convert.gguf_format import write_gguf
from jaxllama.convert.hf import write_hf
from jaxllama.convert.jaxllama_format import write_jaxllama
from jaxllama.convert.meta import write_meta
from jaxllama.model.llama import Arch

WRITERS = {"hf": (write_hf, ""), "meta": (write_meta, ""), "gguf": (write_gguf, ".gguf"),
           "jaxllama": (write_jaxllama, "")}


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """One random model (llama3 rope, GQA; Meta's published ffn rule: multiple_of 256 -> 256) in every format."""
    d = tmp_path_factory.mktemp("pairs")
    m = load_config(None, ["model.preset=debug", "data.seq_len=32", "model.ffn_dim=256", "model.rope_type=llama3",
                           "model.rope_factor=8", "model.rope_theta=500000", "model.max_position=131072"]).model
    params = random_params(Arch.from_config(m), seed=11)
    paths = {}
    for fmt, (write, ext) in WRITERS.items():
        paths[fmt] = d / f"origin-{fmt}{ext}"
        write(ParamsSource(params, m), paths[fmt])
    return d, params, m, paths


@pytest.mark.parametrize("x,y", list(itertools.permutations(WRITERS, 2)))
def test_round_trip_through_another_format_is_lossless(origin, x, y):
    d, params, m, paths = origin
    mid = d / f"{x}-to-{y}{WRITERS[y][1]}"
    back = d / f"{x}-to-{y}-to-{x}{WRITERS[x][1]}"
    convert(str(paths[x]), str(mid), y)
    convert(str(mid), str(back), x)
    loaded = load_model(str(back))
    assert loaded.model_cfg == m
    assert loaded.tokenizer_path is None  # the origin has no tokenizer, and none is invented
    a, b = flat_arrays(params), flat_arrays(loaded.params)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == np.float32, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_output_folders_get_the_usual_mode(tmp_path):
    """DST appears by renaming a temporary folder (mkdtemp: 0700); it must end with the umask's mode."""
    import os
    import stat

    from jaxllama.convert.common import atomic_output

    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out") as d:
            (d / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
