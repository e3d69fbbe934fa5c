"""The inference program and parameter placement: ``--mesh data=1,tensor=4`` (+ ``--rules``) -> a
:class:`jaxllama.program.Program` over the first data x fsdp x tensor devices, and params in its shards.

Inference is laid out by the same builder and logical rules as training (default:
``jaxllama.config.DEFAULT_RULES``; ``--rules`` takes a run's), so the shard-shape checks, the error
messages and the KV cache's sharding (it follows the ``kv_heads`` rule) are training's own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxllama.config import DEFAULT_RULES, Config, DataConfig, MeshConfig, ModelConfig
from jaxllama.errors import ConfigError
from jaxllama.model import quant
from jaxllama.model.llama import Arch, abstract_params
from jaxllama.parallel.mesh import AXES, parse_mesh  # noqa: F401  (parse_mesh: the CLI's --mesh)
from jaxllama.parallel.sharding import Layout, ShardError, place
from jaxllama.program import Program, build_program


def inference_program(a: Arch, sizes: dict[str, int] | None = None, devices: list | None = None,
                      rules: list | None = None, data: DataConfig | None = None) -> Program:
    """The program of ``a`` on a ``sizes`` mesh (None: the widest tensor split the shapes allow).

    ``data``: the batch the program runs (eval); by default one row per device and one token, the
    smallest batch every rule can split (the engine pads its batches to the batch shards)."""
    devices = list(jax.devices() if devices is None else devices)
    if not sizes:
        return _widest(a, devices, rules, data)
    n = math.prod(sizes[k] for k in AXES)
    desc = ",".join(f"{k}={sizes[k]}" for k in AXES)
    if n > len(devices):
        raise ConfigError(f"--mesh: {'x'.join(str(sizes[k]) for k in AXES)} = {n} devices, but only "
                          f"{len(devices)} are available")
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(f"--mesh: with {jax.process_count()} processes the mesh must use all {len(devices)} "
                          f"devices, got {n}")
    model = ModelConfig(**{k: getattr(a, k) for k in Arch.model_fields()})
    cfg = Config(model=model, mesh=MeshConfig(**sizes, rules=list(rules or DEFAULT_RULES)),
                 data=data or DataConfig(seq_len=1, global_batch=n))
    try:
        return build_program(cfg, devices[:n], arch=a)
    except ShardError as e:
        if e.name == "data.global_batch":
            raise ConfigError(f"--batch {e.size}: must be divisible by mesh {' x '.join(e.axes)} = {e.n}") from None
        raise ConfigError(f"--mesh: {' x '.join(e.axes)}={e.n} does not divide the model ({desc}): {e}") from None


def _widest(a: Arch, devices: list, rules: list | None, data: DataConfig | None) -> Program:
    for tp in sorted((t for t in range(1, len(devices) + 1) if len(devices) % t == 0), reverse=True):
        try:
            return inference_program(a, {"data": 1, "fsdp": 1, "tensor": tp}, devices, rules, data)
        except ConfigError:
            if tp == 1:
                raise
    raise AssertionError("unreachable")


def inference_arch(a: Arch, dtype: str | None = None, scan_layers: bool | None = None) -> Arch:
    """The model for serving: compute and parameters both in ``dtype`` (default: the arch's compute dtype).

    ``scan_layers=False`` (what ``generate`` uses, as MaxText does for decoding) unrolls the layers:
    each layer then has its own cache buffers, updated in place by the decode loop, and no loop over
    layers runs inside the loop over tokens (2x faster batch-1 decoding on CPU). Params must then be
    in the unrolled tree (:func:`jaxllama.model.llama.unstack_layers`).
    """
    dtype = dtype or a.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype: {dtype!r} is not one of float32, bfloat16, float16")
    scan = a.scan_layers if scan_layers is None else scan_layers
    return dataclasses.replace(a, dtype=dtype, param_dtype=dtype, remat="none", scan_layers=scan)


def param_shardings(a: Arch, layout: Layout) -> Any:
    """NamedShardings for the canonical tree, from the model's logical axis names."""
    return layout.tree_shardings(abstract_params(a))


def place_params(params: Any, a: Arch, layout: Layout, shardings: Any = None) -> Any:
    """Cast to ``a.param_dtype`` and put each leaf in its shards (:func:`jaxllama.parallel.sharding.place`);
    ``shardings``: the program's (``program.state_shardings.params``), else derived from ``layout``."""
    dtype = jnp.dtype(a.param_dtype)
    if layout.mesh is None:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.asarray(x, None if p[-1].key in quant.STORED_AS_IS else dtype), params)
    shardings = shardings or param_shardings(a, layout)
    if jax.tree.structure(params) != jax.tree.structure(shardings):
        raise ConfigError("parameters do not match the model's tree (a checkpoint of another architecture?)")
    return place(params, shardings, dtype, keep=quant.STORED_AS_IS)


def quantized_arch(a: Arch, mode: str, group: int | None = None) -> Arch:
    """``a`` with weight-only quantized block projections, embedding and LM head (``--quantize``,
    ``--group-size``: default per output channel for int8, 128 for int4); one-line errors for a mode
    or group size the model's shapes cannot take."""
    group = quant.resolve_group(a, mode, group)
    if mode == "none":
        return a
    return dataclasses.replace(a, quantize=mode, quant_group=group, quant_embed=True)


def quantize_for_inference(params: Any, a: Arch, layout: Layout, mode: str,
                           group: int | None = None) -> tuple[Any, Arch]:
    """Float params placed for ``a`` -> (quantized params in their shards, the quantized arch). ``params``
    may be the canonical (stacked) tree or the unrolled one ``Llama(a)`` takes; the result keeps it. The
    quantization runs jitted in the shards (each device quantizes its own slice; the scales take their
    kernel's output sharding); the float copy is freed when the caller drops it."""
    qa = quantized_arch(a, mode, group)
    if qa is a:
        return params, a
    from jaxllama.model.llama import unstack_layers

    shardings = None
    if layout.mesh is not None:  # the tree ``params`` comes in: canonical (eval) or the model's (generate)
        shardings = param_shardings(dataclasses.replace(qa, scan_layers=True), layout)
        if "layers" not in params:
            shardings = unstack_layers(shardings, qa.n_layers)
    fn = jax.jit(lambda t: quant.quantize_tree(t, qa.quantize, qa.quant_group, embedding=True),
                 out_shardings=shardings)
    return fn(params), qa


def stored_quantization(a: Arch, params: Any, where: str, quantize: str | None,
                        group: int | None) -> tuple[Arch, str | None]:
    """(arch, what is left to quantize) for a checkpoint that may be stored quantized: such a one runs
    as stored (its arch says so); asking for another quantization of it is a one-line error."""
    stored = quant.detect(params)
    if stored is None:
        if quantize is None and group is not None:
            raise ConfigError("--group-size applies only with --quantize int8 or int4")
        return a, quantize
    mode, g = stored
    if quantize not in (None, mode) or (group is not None and group != g):
        raise ConfigError(f"{where}: stored quantized ({mode}, group size {g}); --quantize {quantize} "
                          f"--group-size {group} would quantize it again: convert from the float model instead")
    return quantized_arch(a, mode, g), None
