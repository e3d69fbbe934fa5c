"""Training checkpoints: save the whole train state with Orbax, resume from the latest complete one.

A step directory ``<dir>/<step>/`` holds five Orbax items:

- ``params``, ``opt_state``: the sharded arrays (each process writes its own shards);
- ``model``: the resolved model config (so ``load_params`` needs nothing else);
- ``train``: step, seed and the full resolved config (the train step takes no RNG: with the seed
  and the step, which the optimizer state and the data position also encode, a resume is exact);
- ``data``: every process's data-source state in its own file (``PerProcessJsonHandler``);
- ``checksums``: a hash of every array of ``params`` and ``opt_state`` (:mod:`.checksum`), compared on
  restore, so bytes changed in place are caught like any other damage.

Orbax writes a step into a temporary directory and renames it when every process has finished
(or, on object stores, writes a commit marker), so an interrupted save is never listed; old steps
are deleted only after a newer one is complete. A step whose files were damaged later fails to read
and is moved aside, and resume falls back to the previous one, saying so.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxllama.checkpoint.checksum import tree_checksums, verify_tree
from jaxllama.checkpoint.handlers import PerProcessJsonHandler, PerProcessJsonRestore, PerProcessJsonSave
from jaxllama.checkpoint.params import CHECKSUMS, MODEL, PARAMS, as_path, check_shapes, model_config_dict, \
    drop_abandoned_reads, recorded_checksums
from jaxllama.config import SHAPE_FIELDS, CheckpointConfig, Config
from jaxllama.errors import ConfigError, RunError, first_line
from jaxllama.interrupts import deferred

OPT_STATE, TRAIN, DATA = "opt_state", "train", "data"
TMP_MARKER = ".orbax-checkpoint-tmp"


def _all_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a host-side all-gather when there are several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


class TrainCheckpoints:
    """The run's Orbax ``CheckpointManager`` plus the policies Orbax leaves to us (fallback, timing)."""

    def __init__(self, directory: str, ccfg: CheckpointConfig, say: Callable[[str], None] = print):
        self.directory = as_path(directory)
        self.say, self.every, self.async_save = say, ccfg.every, ccfg.async_save
        self._report_incomplete()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ccfg.keep, keep_period=ccfg.keep_every or None, create=True,
            enable_async_checkpointing=ccfg.async_save, cleanup_tmp_directories=True)
        handlers = {PARAMS: ocp.StandardCheckpointHandler(), OPT_STATE: ocp.StandardCheckpointHandler(),
                    MODEL: ocp.JsonCheckpointHandler(), TRAIN: ocp.JsonCheckpointHandler(),
                    DATA: PerProcessJsonHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()}
        try:
            self.mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except OSError as e:
            raise ConfigError(f"checkpoint.dir {self.directory}: cannot create it ({e.strerror or e})") from None
        self.block_times: list[float] = []

    def _report_incomplete(self) -> None:
        if jax.process_index() == 0 and self.directory.is_dir():
            for p in sorted(self.directory.iterdir()):
                if TMP_MARKER in p.name:
                    self.say(f"ignoring incomplete checkpoint {p} (interrupted save); it will be removed")

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def due(self, step: int, final: bool) -> bool:
        """Every ``checkpoint.every`` steps, and at the end (or preemption)."""
        return final or bool(self.every and step % self.every == 0)

    def save(self, step: int, state: Any, cfg: Config, data_state: dict, loss: float | None = None) -> float:
        """Start saving ``state`` as ``step``; returns (and reports) the seconds the caller was blocked.
        ``loss``: the last step's, recorded so a resume can tell a damaged checkpoint from a diverged run."""
        # Steps are dispatched ahead: wait for them to finish computing first, so the figure is the
        # save's own cost, not the queued steps' compute time.
        jax.block_until_ready(state)
        self._check_space(state)
        start = time.perf_counter()
        args = ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(state.params),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            MODEL: ocp.args.JsonSave(model_config_dict(cfg.model)),
            TRAIN: ocp.args.JsonSave(dict(step=step, seed=cfg.train.seed, process_count=jax.process_count(),
                                          loss=loss, config=cfg.to_dict())),
            DATA: PerProcessJsonSave(data_state),
            CHECKSUMS: ocp.args.JsonSave({PARAMS: tree_checksums(state.params),
                                          OPT_STATE: tree_checksums(state.opt_state)}),
        })
        try:
            with deferred():  # Ctrl-C here: the save is handed over whole, then the run stops
                self.mngr.save(step, args=args, force=True)  # also reports the previous save's failure, if any
        except Exception as e:  # noqa: BLE001 - a failed write (disk full, permissions): one line, older steps kept
            raise self._save_failed(e) from None
        blocked = time.perf_counter() - start
        self.block_times.append(blocked)
        self.say(f"checkpoint at step {step}: the save blocked training for {1000 * blocked:.0f} ms"
                 f"{' (written in the background)' if self.async_save else ''}")
        return blocked

    def close(self) -> None:
        try:
            with deferred():  # Ctrl-C while a save finishes: it still finishes (Ctrl-C again: exit now)
                self.mngr.wait_until_finished()
                self.mngr.close()
        except Exception as e:  # noqa: BLE001 - the last save failed in the background
            raise self._save_failed(e) from None

    def _save_failed(self, e: Exception) -> RunError:
        first = first_line(e, 10_000)
        cause = "No space left on device" if "No space left" in first else first[:300]
        return RunError(f"checkpoint save in {self.directory} failed ({cause}); the earlier complete checkpoints are "
                        "kept and a rerun resumes from the newest")

    def _check_space(self, state: Any) -> None:
        """Refuse a save that cannot fit on a local disk before starting it (a write that runs out of space
        midway is reported by Orbax's threads many times over, and leaves a temporary folder)."""
        if "://" in str(self.directory):
            return
        import shutil

        need = sum(s.data.nbytes for x in jax.tree.leaves((state.params, state.opt_state))
                   for s in getattr(x, "addressable_shards", ()) if s.replica_id == 0)
        free = shutil.disk_usage(self.directory).free
        if free < 1.1 * need + (16 << 20):
            raise RunError(f"checkpoint.dir {self.directory}: {free / 2**20:,.1f} MiB free, a checkpoint needs about "
                           f"{need / 2**20:,.1f} MiB; free space (or set checkpoint.dir elsewhere) and rerun to resume")

    def restore_latest(self, state: Any, shardings: Any, model_cfg: Any,
                       accept: Callable[[dict], None] | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, this process's data state) of the newest readable checkpoint, or None if none.

        ``state``/``shardings`` give the target shapes and placement: arrays are read straight into
        the current mesh's shards, whatever mesh wrote them. Shape mismatches are config errors;
        any other failure marks the step damaged, moves it aside, and tries the previous one: unreadable
        files, arrays whose checksum differs, and a data state ``accept`` (the input pipeline's
        ``restore``) rejects.
        """
        steps = self.steps()
        drop_abandoned_reads()
        for i, step in enumerate(reversed(steps)):
            self._check_shapes(step, state, model_cfg)
            try:
                restored = self._restore(step, state, shardings)
                if accept is not None:
                    accept(restored[2])
                error = None
            except ConfigError:  # the user's to fix (e.g. another data source): nothing is damaged
                raise
            except Exception as e:  # noqa: BLE001 - any read failure marks the step as damaged
                drop_abandoned_reads()
                restored, error = None, first_line(e)
            if _all_agree(error is None):
                return restored
            older = steps[-i - 2] if i + 2 <= len(steps) else None
            self.say(f"checkpoint step {step} in {self.directory} is damaged ({error or 'on another process'}); "
                     + (f"falling back to step {older}" if older is not None else "no older checkpoint"))
            self._move_aside(step)
        if steps:
            raise RunError(f"{self.directory}: no readable checkpoint among steps {steps}; "
                           f"remove the directory or train with --no-resume and a new run_dir")
        return None

    def _restore(self, step: int, state: Any, shardings: Any) -> tuple[int, Any, dict]:
        def target(tree, sh):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

        out = self.mngr.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(target(state.params, shardings.params)),
            OPT_STATE: ocp.args.StandardRestore(target(state.opt_state, shardings.opt_state)),
            TRAIN: ocp.args.JsonRestore(),
            DATA: PerProcessJsonRestore(),
        }))
        saved_step = int(out[TRAIN]["step"])
        if saved_step != step:
            raise RunError(f"step directory {step} records step {saved_step}")
        sums = recorded_checksums(self.directory / str(step))
        verify_tree(out[PARAMS], sums.get(PARAMS), "params")
        verify_tree(out[OPT_STATE], sums.get(OPT_STATE), "opt_state")
        self.recorded_loss = out[TRAIN].get("loss")
        step_array = jax.device_put(np.asarray(step, np.int32), shardings.step)
        new_state = state.replace(step=step_array, params=out[PARAMS], opt_state=out[OPT_STATE])
        return step, new_state, out[DATA]

    def _check_shapes(self, step: int, state: Any, model_cfg: Any) -> None:
        """A config whose shapes (or process count) differ from the checkpoint's is the user's error: name them."""
        step_dir = self.directory / str(step)
        try:
            meta = self.mngr.item_metadata(step)
            stored, stored_opt = meta[PARAMS].tree, meta[OPT_STATE].tree
            saved_model = ocp.JsonCheckpointHandler().restore(step_dir / MODEL)
            saved_train = ocp.JsonCheckpointHandler().restore(step_dir / TRAIN)
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself reports the damage
            return
        writers = saved_train.get("process_count", 1)
        if writers != jax.process_count():
            raise ConfigError(f"checkpoint {step_dir} was written by {writers} process(es), this run has "
                              f"{jax.process_count()}: each process's data position is saved separately, so "
                              f"resume with {writers} (or start a new run_dir)")
        fields = [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {getattr(model_cfg, k)!r}"
                  for k in SHAPE_FIELDS if k in saved_model and saved_model[k] != getattr(model_cfg, k)]
        advice = "; resume needs the same shapes (use a new run_dir, or --no-resume)"
        try:
            check_shapes(stored, state.params, f"checkpoint {step_dir}")
        except ConfigError as e:
            if fields:
                raise ConfigError(f"checkpoint {step_dir} does not fit the config: {'; '.join(fields)}{advice}") from None
            raise ConfigError(f"{e}{advice}") from None
        shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
        if shapes(stored_opt) != shapes(state.opt_state):
            raise ConfigError(f"checkpoint {step_dir}: the optimizer state has {len(jax.tree.leaves(stored_opt))} "
                              f"arrays of other shapes than this config's optimizer "
                              f"({len(jax.tree.leaves(state.opt_state))}){advice}")

    def _move_aside(self, step: int) -> None:
        """Rename a damaged step so it is neither chosen again nor in the way of a new save of that step."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{step}.damaged-{int(time.time())}"
            src.rename(dst)
            self.say(f"moved the damaged checkpoint to {dst}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxllama_move_aside_{step}")
        self.mngr.reload()

