"""Parameters alone: save them with their model config, load them from any checkpoint we write.

``save_params`` writes an Orbax composite checkpoint with two items, ``params`` (the canonical
tree) and ``model`` (the resolved :class:`ModelConfig` as JSON), so a loader needs nothing else,
plus ``checksums`` (:mod:`.checksum`), which every reader compares with what it read.
A training checkpoint step has the same two items (plus optimizer, train and data state), so
``load_params`` reads either the same way, and a run dir resolves to its latest complete step.
Paths go through Orbax/TensorStore unchanged, so ``gs://...`` works like a local folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxllama.checkpoint.checksum import leaf_name, per_layer, tree_checksums, verify_slice, verify_tree
from jaxllama.config import ModelConfig
from jaxllama.errors import ConfigError, RunError, first_line

PARAMS, MODEL, CHECKSUMS = "params", "model", "checksums"
CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints/<step>/


def as_path(path: str | epath.PathLike) -> epath.Path:
    """A local path made absolute (TensorStore requires it); URLs such as gs://... unchanged."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def model_config_dict(model_cfg: ModelConfig) -> dict:
    return dataclasses.asdict(model_cfg)


def model_config_from_dict(d: dict, where: str) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown model config fields {', '.join(unknown)} (written by a newer jaxllama?)")
    return ModelConfig(**d)


def save_params(path: str, params: Any, model_cfg: ModelConfig) -> None:
    """Write ``params`` (canonical tree of jax or numpy arrays) and ``model_cfg`` to a new directory ``path``.

    Orbax writes into a temporary directory and renames it when complete, so an interrupted save
    never leaves something ``load_params`` would read. An existing ``path`` is refused rather than
    replaced, so a typo cannot destroy a checkpoint.
    """
    target = as_path(path)
    if target.exists():
        raise ConfigError(f"{path}: already exists; save_params writes a new directory (remove it or pick another)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(target, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params),
            MODEL: ocp.args.JsonSave(model_config_dict(model_cfg)),
            CHECKSUMS: ocp.args.JsonSave({PARAMS: tree_checksums(params)}),
        }))


def recorded_checksums(d: epath.Path) -> dict:
    """The ``checksums`` item of a directory (``{}`` for checkpoints written before there were any)."""
    if not (d / CHECKSUMS).is_dir():
        return {}
    return ocp.JsonCheckpointHandler().restore(d / CHECKSUMS) or {}


def is_params_dir(path: epath.Path) -> bool:
    """A directory holding the ``params`` and ``model`` items (params-only export or a training step)."""
    return (path / PARAMS).is_dir() and (path / MODEL).is_dir()


def complete_steps(checkpoints_dir: epath.Path) -> list[int]:
    """Steps whose checkpoint Orbax finalized, oldest first (temporary, half-written ones excluded)."""
    if not checkpoints_dir.is_dir():
        return []
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with _quiet_orbax():  # Orbax warns that a read-only manager is read-only
        with ocp.CheckpointManager(checkpoints_dir, options=options) as mngr:
            return sorted(mngr.all_steps())


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax's warnings about what we do on purpose (read-only managers; a params dir's ``tokenizer/``
    folder, which is plain files, not an Orbax item) would print on every read; errors still do."""
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_log.setLevel(level)


def resolve_params_dirs(path: str) -> list[epath.Path]:
    """The candidate directories ``path`` names, best first: itself, or a run's steps newest first."""
    p = as_path(path)
    if not p.exists():
        raise ConfigError(f"{path}: no such checkpoint directory")
    if is_params_dir(p):
        return [p]
    for ckpt_dir in (p / CHECKPOINTS, p):
        steps = complete_steps(ckpt_dir)
        if steps:
            return [ckpt_dir / str(s) for s in reversed(steps)]
    raise ConfigError(f"{path}: not a jaxllama checkpoint (expected a params dir with '{PARAMS}/' and '{MODEL}/', "
                      f"a training checkpoint step, or a run dir with complete checkpoints under '{CHECKPOINTS}/')")


@contextlib.contextmanager
def _reader() -> Iterator[ocp.Checkpointer]:
    """A checkpointer that knows every item we write, so reading some of them raises no Orbax warnings."""
    from jaxllama.checkpoint.handlers import PerProcessJsonHandler

    with _quiet_orbax(), ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{
            PARAMS: ocp.StandardCheckpointHandler(), MODEL: ocp.JsonCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(), "train": ocp.JsonCheckpointHandler(),
            "data": PerProcessJsonHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()})) as ckptr:
        yield ckptr


def params_target(meta: Any, where: str, shardings: Any = None, dtype: Any = None) -> Any:
    """ShapeDtypeStructs for the stored arrays ``meta``, placed per ``shardings`` (default: one device)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if shardings is None:
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=default), meta)
    try:
        return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s), meta, shardings)
    except ValueError as e:
        raise ConfigError(f"{where}: the given shardings do not match the stored parameter tree ({e})") from None


def check_shapes(stored: Any, expected: Any, where: str) -> None:
    """Raise ConfigError naming every leaf whose stored shape differs from the expected one."""
    s_flat = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    e_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    name = jax.tree_util.keystr
    diffs = [f"{name(k)}: checkpoint {tuple(s_flat[k].shape)}, expected {tuple(v.shape)}"
             for k, v in e_flat.items() if k in s_flat and tuple(s_flat[k].shape) != tuple(v.shape)]
    missing = [name(k) for k in e_flat if k not in s_flat]
    extra = [name(k) for k in s_flat if k not in e_flat]
    if missing:
        diffs.append(f"missing from the checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        diffs.append(f"not expected: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if diffs:
        raise ConfigError(f"{where}: shapes differ from the config: {'; '.join(diffs)}")


def restore_params(step_dir: epath.Path, shardings: Any = None, dtype: Any = None) -> tuple[Any, ModelConfig]:
    """The ``params`` and ``model`` items of one directory (any other items are left unread)."""
    with _reader() as ckptr:
        meta = ckptr.metadata(step_dir).item_metadata[PARAMS].tree
        target = params_target(meta, str(step_dir), shardings, dtype)
        out = ckptr.restore(step_dir, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(target), MODEL: ocp.args.JsonRestore()}))
    if dtype is None:  # a cast on read changes the bits; the stored ones were checked by the last save's reader
        verify_tree(out[PARAMS], recorded_checksums(step_dir).get(PARAMS), f"{step_dir}: params")
    return out[PARAMS], model_config_from_dict(out[MODEL], str(step_dir / MODEL))


def drop_abandoned_reads() -> None:
    """After a failed restore Orbax leaves its other read coroutines unfinished; when they are collected
    Python prints each one's error and a TensorStore spec ("Exception ignored in <coroutine ...>"), the
    damage we already report in one line; and TensorStore's reader threads, finishing late, report each
    completion they can no longer deliver to the restore's closed event loop ("Event loop is closed").
    Readers call this before reading (the threads can report while the failure is still being raised)
    and after a failure (to collect the coroutines now); those reports, and only those, are dropped."""
    previous, previous_exc = sys.unraisablehook, sys.excepthook
    if not getattr(previous, "jaxllama", False):
        def late(kind, value) -> bool:
            return kind is RuntimeError and str(value) == "Event loop is closed"

        def hook(unraisable) -> None:
            code = getattr(unraisable.object, "cr_code", None)
            if not (code is not None and "orbax" in code.co_filename) and not late(unraisable.exc_type,
                                                                                  unraisable.exc_value):
                previous(unraisable)

        def exc_hook(kind, value, tb) -> None:
            if not late(kind, value):
                previous_exc(kind, value, tb)

        hook.jaxllama = True
        sys.unraisablehook, sys.excepthook = hook, exc_hook
    gc.collect()


def first_readable(candidates: list[epath.Path], read: Callable[[epath.Path], Any],
                   say: Callable[[str], None] = print) -> tuple[epath.Path, Any]:
    """``read`` the first candidate that reads cleanly; a damaged one is reported and skipped."""
    errors = []
    drop_abandoned_reads()
    for i, d in enumerate(candidates):
        try:
            return d, read(d)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure marks the checkpoint as damaged
            drop_abandoned_reads()
            line = first_line(e)
            errors.append(f"{d}: {line}")
            if i + 1 < len(candidates):
                say(f"checkpoint {d} is damaged or incomplete ({line}); falling back to {candidates[i + 1]}")
    raise RunError("no readable checkpoint: " + " | ".join(errors))


def load_params(path: str, shardings: Any = None, dtype: Any = None) -> tuple[Any, ModelConfig]:
    """Parameters and model config from a params dir, a training step dir, or a run dir (latest complete step).

    With ``shardings`` (a pytree of ``NamedSharding`` matching the params) every array is read
    directly into its shards; otherwise onto this process's first device. ``dtype`` (e.g.
    ``jnp.bfloat16``) casts on read.
    """
    if dtype is not None:
        dtype = np.dtype(dtype)

    _, (params, model_cfg) = first_readable(resolve_params_dirs(path), lambda d: restore_params(d, shardings, dtype))
    return params, model_cfg


class LazyArray:
    """One stored parameter, read on indexing: ``a[i]`` reads layer i only; ``np.asarray(a)`` reads it all.
    Each read is checked against the checksums recorded at save (``sums``: one pair per layer for stacked
    arrays, else one), so conversion never writes out damaged weights."""

    def __init__(self, store: Any, name: str = "", sums: list | None = None, where: str = ""):
        self.store, self.shape, self.dtype = store, tuple(store.shape), np.dtype(store.dtype.numpy_dtype)
        self.name, self.sums, self.where = name, sums, where
        self.layered = per_layer(name, len(self.shape))

    def _check(self, out: np.ndarray, layer: int | None) -> np.ndarray:
        if self.sums is not None:
            label = f"{self.where}: {self.name}" + ("" if layer is None else f" (layer {layer})")
            if layer is not None:
                verify_slice(out, self.sums[layer], label)
            elif self.layered:
                for i in range(out.shape[0]):
                    verify_slice(out[i], self.sums[i], f"{label} (layer {i})")
            else:
                verify_slice(out, self.sums[0], label)
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        out = self.store[index].read().result()
        if self.layered and isinstance(index, (int, np.integer)):
            return self._check(out, int(index) % self.shape[0])
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._check(self.store.read().result(), None)
        return out if dtype is None else out.astype(dtype)


def open_params(path: str) -> tuple[dict[str, Any], ModelConfig]:
    """Every stored parameter as a :class:`LazyArray` ({"layers/mlp/gate_proj/kernel": ...}) and the config.

    Why: conversion reads one layer of one tensor at a time, so its memory stays bounded whatever the
    model size, whereas an Orbax restore reads whole arrays (a 405B model's stacked MLP kernel alone is
    over 200 GB). The arrays are opened with TensorStore in the layout Orbax writes (OCDBT, one zarr
    array per leaf named by its dotted path); a checkpoint in any other layout is restored whole.
    """
    def read(d: epath.Path) -> tuple[dict[str, Any], ModelConfig]:
        with _reader() as ckptr:
            meta = ckptr.metadata(d).item_metadata[PARAMS].tree
        model_cfg = read_model_config(d)
        flat = {leaf_name(path): m for path, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
        sums = recorded_checksums(d).get(PARAMS, {})
        try:
            context = _chunk_cache(max((_nbytes(m) for m in flat.values()), default=0))
            arrays = {k: LazyArray(_open_leaf(d / PARAMS, k, context), k, sums.get(k), str(d)) for k in flat}
        except Exception:  # noqa: BLE001 - not the layout we know: fall back to Orbax's whole-array restore
            params, model_cfg = restore_params(d)
            return {k: v for k, v in _flat_leaves(params)}, model_cfg
        for k, a in arrays.items():
            if a.shape != tuple(flat[k].shape):
                raise RunError(f"{d}: {k} is stored as {a.shape} but its metadata says {tuple(flat[k].shape)}")
        return arrays, model_cfg

    _, out = first_readable(resolve_params_dirs(path), read)
    return out


def read_model_config(d: epath.Path) -> ModelConfig:
    """The ``model`` item of one directory alone (no array is read)."""
    with _reader() as ckptr:
        model = ckptr.restore(d, args=ocp.args.Composite(**{MODEL: ocp.args.JsonRestore()}))[MODEL]
    return model_config_from_dict(model, str(d / MODEL))


def load_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a params dir, a training step dir, or a run dir's latest complete step."""
    return first_readable(resolve_params_dirs(path), read_model_config)[1]


CHUNK_CACHE_LIMIT = 4 << 30  # bytes of decoded chunks kept while reading one params dir


def _nbytes(meta: Any) -> int:
    return int(np.prod(meta.shape, dtype=np.int64)) * np.dtype(getattr(meta.dtype, "numpy_dtype", meta.dtype)).itemsize


def _chunk_cache(largest: int) -> Any:
    """A TensorStore context whose chunk cache holds the largest stored array (at most
    CHUNK_CACHE_LIMIT). Why: Orbax writes a stacked [layers, ...] array as one zstd chunk, so each
    ``a[i]`` decoded the whole array again: reading the 135M model layer by layer took 27 s, 30x its
    whole-array read. Reading tensor by tensor (:func:`jaxllama.convert.common.stacked_params`) now
    decodes each chunk once; a reader that goes layer by layer across tensors (the HF/GGUF writers)
    keeps at most this much besides what it holds."""
    import tensorstore as ts

    return ts.Context({"cache_pool": {"total_bytes_limit": int(min(max(largest, 1), CHUNK_CACHE_LIMIT))}})


def _open_leaf(item_dir: epath.Path, key: str, context: Any = None) -> Any:
    import tensorstore as ts

    base = str(item_dir) if "://" in str(item_dir) else f"file://{item_dir}"
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base.rstrip("/") + "/",
                                          "path": key.replace("/", ".") + "/"},
            "recheck_cached_data": False}  # the directory is not written while it is read
    return ts.open(spec, read=True, open=True, context=context).result()


def _flat_leaves(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v

