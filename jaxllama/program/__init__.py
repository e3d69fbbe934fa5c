"""THE builder: a resolved config + devices -> one frozen :class:`Program`, validated once.

``build_program(cfg, devices)`` assembles, here and nowhere else: the mesh plan (DCN x ICI), the mesh
over ``devices`` (real, simulated, a TPU topology's, or an int: an abstract mesh), the layout, the
arch and model, the optimizer and schedule, the abstract train state and its shardings, the batch
spec, the loss and the jitted train and eval steps. Training, ``compile-check``, ``info``, eval,
``train.init_from`` and inference placement all ask it. Only here are the layout and the shapes both
known, so here every parameter's and activation's shard shape is checked (one line for the first
that does not divide). The pieces: :mod:`.step` (loss, state, train step), :mod:`.optimizer`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

from jaxllama.config import Config, reference_mode
from jaxllama.data.batch import BATCH_DTYPES
from jaxllama.errors import ConfigError
from jaxllama.model.llama import KV_AXES, LAYER_CACHE_AXES, Q_AXES, Arch, Llama, abstract_params, model_params
from jaxllama.parallel.mesh import MeshPlan, mesh_platform
from jaxllama.parallel.sharding import (BATCH_AXES, RESIDUAL_AXES, Layout, ShardError, axis_tuple, boxed_shapes,
                                        check_divisible, rules_from_config)
from jaxllama.program.optimizer import make_optimizer
from jaxllama.program.step import (TrainState, init_base, init_state, make_loss_fn, make_train_step,
                                   state_shardings)

# The activations the model constrains (and so the layout must split evenly), per token:
# [batch, length, ...] plus these trailing dims. The KV cache uses the k/v names (CACHE_AXES).
_ACTIVATIONS = {"activations/residual": RESIDUAL_AXES, "activations/q": Q_AXES, "activations/k_v": KV_AXES}
# The KV cache: [layers, batch, kv_heads, cache_len, head_dim] (scanned) or per layer without "layers".
CACHE_AXES = ("layers",) + LAYER_CACHE_AXES


@dataclass(frozen=True)
class BatchSpec:
    """The global batch: keys and dtypes (:mod:`jaxllama.data.batch`), shape, sharding, assembly."""

    rows: int
    seq_len: int
    sharding: Any
    extra: tuple = ()  # (key, trailing shape, dtype) of per-row arrays beyond the token rows (DPO: ref_logps)

    def _keys(self, extra: bool = True) -> dict[str, tuple]:
        keys = {k: ((self.seq_len,), dt) for k, dt in BATCH_DTYPES.items()}
        keys.update({k: (tail, dt) for k, tail, dt in self.extra} if extra else {})
        return keys

    def shardings(self, extra: bool = True) -> dict[str, Any]:
        return {k: self.sharding for k in self._keys(extra)}

    def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct((self.rows, *tail), dt, sharding=self.sharding)
                for k, (tail, dt) in self._keys().items()}

    def to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays split over the batch axes (every process calls it).
        The extra keys are taken when ``local`` has them (eval batches have none)."""
        return {k: jax.make_array_from_process_local_data(self.sharding, np.asarray(local[k], dt),
                                                          (self.rows,) + np.shape(local[k])[1:])
                for k, (_, dt) in self._keys().items() if k in local}


@dataclass(frozen=True, eq=False)
class Program:
    """Everything a run is made of, built once by :func:`build_program`. Holds no arrays."""

    cfg: Config
    plan: MeshPlan
    layout: Layout
    arch: Arch
    model: Llama
    tx: Any
    schedule: Callable
    abstract_state: TrainState  # ShapeDtypeStructs
    state_shardings: TrainState
    batch: BatchSpec
    loss_fn: Callable
    train_step: Callable  # jitted: (state, batch) -> (state, metrics); donates the state
    eval_step: Callable  # jitted: (params, batch) -> (nll_sum, n_tokens)

    @property
    def mesh(self) -> Any:
        return self.layout.mesh

    def abstract_inputs(self) -> tuple[TrainState, dict]:
        """(state, batch) as ShapeDtypeStructs carrying their shardings: what ``lower`` needs, unallocated."""
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             self.abstract_state, self.state_shardings)
        return state, self.batch.abstract()

    def model_params(self, params: Any) -> Any:
        """The state's canonical tree (layers stacked) -> the tree the model takes: unrolled
        (``layers_0`` ...) when ``arch.scan_layers`` is off. Params, their shardings or abstract ones."""
        return model_params(params, self.arch)

    @property
    def params_shardings(self) -> Any:
        """Shardings of the whole canonical parameter tree (a LoRA state's base and adapters together)."""
        return self.state_shardings.model_tree()

    def init_state(self, seed: int | None = None, frozen: Any = None) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shards (``frozen``: a LoRA
        run's base weights, else created from the seed too)."""
        return init_state(self.model, self.tx, self.state_shardings, self.cfg.train.seed if seed is None else seed,
                          frozen)

    def init_base(self) -> Any:
        """A LoRA program's frozen base created from ``train.seed`` (when there is no ``train.init_from``)."""
        return init_base(self.model, self.state_shardings, self.cfg.train.seed)


def build_program(cfg: Config, devices: list | int | None = None, arch: Arch | None = None,
                  unroll_loss: bool = False) -> Program:
    """Build and validate the program of ``cfg`` on ``devices`` (default: all of JAX's; an int: an
    abstract mesh of that many devices). ``arch`` overrides the model config's (inference dtypes);
    ``unroll_loss``: the loss chunks without a loop (compile-check's cost variants)."""
    n = (jax.device_count() if devices is None else devices) if isinstance(devices, (int, type(None))) else len(devices)
    plan = MeshPlan.resolve(cfg.mesh, n)
    mesh = plan.abstract() if isinstance(devices, int) else plan.build(jax.devices() if devices is None else devices)
    layout = Layout(mesh, rules_from_config(cfg.mesh.rules))
    arch = arch or Arch.from_config(cfg.model, cfg.train.lora)
    platform = mesh_platform(mesh)
    if arch.attention == "cudnn" and platform not in (None, "gpu"):
        raise ConfigError(f"model.attention=cudnn needs a GPU (cuDNN flash attention), but this program runs on "
                          f"{platform} devices; use auto, xla or dot_product")
    if arch.attention == "cpu_flash" and platform not in (None, "cpu") and cfg.model.attention == "auto":
        # auto resolved for this host's CPU backend, but the mesh is another platform's (TPU devices
        # from a CPU host): the reference, as before the CPU kernel existed
        arch = dataclasses.replace(arch, attention="xla")
    if arch.attention == "cpu_flash" and platform not in (None, "cpu"):
        raise ConfigError(f"model.attention=cpu_flash is the CPU kernel, but this program runs on {platform} "
                          f"devices; use auto, xla or dot_product")
    model = Llama(arch, layout)
    d, t = cfg.data, cfg.train
    if d.format == "preference" and t.objective == "lm":  # data inspect may read pairs; training needs an objective
        raise ConfigError("train.objective=lm with data.format=preference: pairs train with train.objective=dpo, "
                          "simpo or orpo")
    rows = layout.shards("activation_batch")
    if d.global_batch % (rows * t.grad_accum):
        axes = axis_tuple(layout.mesh_axes("activation_batch"))
        need = rows * t.grad_accum
        raise ShardError(f"data.global_batch={d.global_batch} must be divisible by mesh {' x '.join(axes)} = {rows}"
                         + (f" times train.grad_accum={t.grad_accum}" if t.grad_accum > 1 else "")
                         + f"; set data.global_batch to a multiple of {need} (e.g. data.global_batch={need})",
                         "data.global_batch", d.global_batch, axes, rows)
    if arch.quantize == "int4":
        from jaxllama.model.quant import check_group

        for d_in in {arch.dim, arch.n_heads * arch.head_dim, arch.ffn_dim}:
            check_group(d_in, arch.quant_group, "train.lora.group_size")
    boxed = abstract_params(dataclasses.replace(arch, scan_layers=True))  # the state's tree is the canonical one
    check_shapes(layout, arch, boxed, d.global_batch // t.grad_accum, d.seq_len)
    tx, schedule = make_optimizer(cfg.optim, t.steps)
    reference = reference_mode(cfg) if t.objective == "dpo" else "none"
    ref_boxed = abstract_params(reference_arch(arch)) if reference == "separate" else None
    abstract, shardings = state_shardings(boxed, tx, layout, adapters_only=arch.lora_rank > 0,
                                          reference_boxed=ref_boxed)
    extra = (("ref_logps", (2 * d.pairs_per_row,), np.float32),) if reference == "cached" else ()
    batch = BatchSpec(d.global_batch, d.seq_len, layout.batch_sharding(), extra)
    lm_loss_fn = make_loss_fn(model, arch, d.seq_len, t.z_loss, t.loss_chunk, unroll_loss)
    loss_fn = lm_loss_fn
    if t.objective != "lm":
        from jaxllama.program.preference import make_preference_loss_fn

        loss_fn = make_preference_loss_fn(model, arch, d.seq_len, t.dpo, t.objective, d.pairs_per_row, reference,
                                          t.loss_chunk)
    step = make_train_step(loss_fn, tx, schedule, t.grad_accum, layout,
                           dropout_seed=t.seed if arch.lora_dropout > 0 else None)
    train_step = jax.jit(step, in_shardings=(shardings, batch.shardings()),
                         out_shardings=(shardings, layout.replicated()), donate_argnums=(0,))

    def eval_fn(params, batch):  # the next-token loss on the trained tokens (preference runs: both responses)
        _, (n_tokens, sums) = lm_loss_fn(params, batch)
        return sums["loss"], n_tokens

    eval_step = jax.jit(eval_fn, in_shardings=(shardings.model_tree(), batch.shardings(extra=False)),
                        out_shardings=(layout.replicated(), layout.replicated()))
    return Program(cfg, plan, layout, arch, model, tx, schedule, abstract, shardings, batch, loss_fn,
                   train_step, eval_step)


def reference_arch(arch: Arch) -> Arch:
    """The architecture of a separate DPO reference: the policy's, float, without adapters, scanned
    (the canonical tree)."""
    return dataclasses.replace(arch, lora_rank=0, lora_dropout=0.0, quantize="none", scan_layers=True)


def check_shapes(layout: Layout, arch: Arch, boxed_params: Any, rows: int, length: int) -> None:
    """Every parameter's and constrained activation's shard shape divides under ``layout`` (else one line)."""
    heads = {"activations/residual": (arch.dim,), "activations/q": (arch.n_heads, arch.head_dim),
             "activations/k_v": (arch.n_kv_heads, arch.head_dim)}
    arrays = boxed_shapes(boxed_params)
    arrays.append(("batch", (rows, length), BATCH_AXES))
    arrays += [(name, (rows, length, *heads[name]), names) for name, names in _ACTIVATIONS.items()]
    check_divisible(layout, arrays)
