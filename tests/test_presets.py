"""Each preset's parameter count equals the published figure, from abstract shapes only."""

import math

import jax
import pytest

from jaxllama.config import load_config
from jaxllama.model.llama import Arch, abstract_params
from jaxllama.model.presets import PRESETS

# Published counts (model cards / the released checkpoints' tensor sizes).
PUBLISHED = {
    "llama1-7b": 6_738_415_616, "llama1-13b": 13_015_864_320, "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672, "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824,
}


def test_every_published_preset_is_listed():
    assert set(PUBLISHED) == set(PRESETS) - {"tiny", "debug"}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_parameter_count(preset):
    a = Arch.from_config(load_config(None, [f"model.preset={preset}"]).model)
    shapes = abstract_params(a)
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # abstract: nothing was allocated
    assert sum(math.prod(x.shape) for x in leaves) == PUBLISHED[preset]


def test_tiny_is_a_few_million_parameters():
    a = Arch.from_config(load_config(None, ["model.preset=tiny"]).model)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(a)))
    assert 1_000_000 < n < 10_000_000


@pytest.mark.parametrize("preset", [*PUBLISHED, "debug"])
def test_scan_layers_follows_the_preset_unless_set(preset):
    """Every preset scans its layers except tiny (4 layers, unrolled: quicker on CPU, as quick to
    compile); an explicit model.scan_layers wins either way."""
    resolved = load_config(None, [f"model.preset={preset}"]).model.scan_layers
    assert resolved is True
    assert load_config(None, [f"model.preset={preset}", "model.scan_layers=false"]).model.scan_layers is False
    assert load_config(None, ["model.preset=tiny"]).model.scan_layers is False
    assert load_config(None, ["model.preset=tiny", "model.scan_layers=true"]).model.scan_layers is True
