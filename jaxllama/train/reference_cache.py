"""``train.dpo.reference=cached``: the reference's log-probability of every sequence, computed once.

Before the first step, one unshuffled pass over the training pairs runs the reference (LoRA's base
without adapters, or ``train.dpo.reference_path`` / ``train.init_from``) and stores each sequence's
log-probability under a key of its content (tokens, targets and loss mask of its segment): a
sequence's value does not depend on where packing puts it, so the shuffled, repacked training
batches find theirs by the same key. Training then runs no reference forward pass at all.

The table lives in ``RUN_DIR/reference_logps.npz`` with an identity (hash of the reference's files,
the data files and the ``data.*`` settings): a resumed run reuses it, a changed reference or data
rebuilds it. One process only for now (each process would need the others' rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxllama.errors import ConfigError, RunError

FILE = "reference_logps.npz"


def segment_keys(batch: dict[str, np.ndarray], pairs_per_row: int) -> list[list[bytes | None]]:
    """Per row, per segment slot (``2 * pairs_per_row``): the content key of that sequence, or None."""
    out = []
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        row = []
        for s in range(1, 2 * pairs_per_row + 1):
            m = seg == s
            if not m.any():
                row.append(None)
                continue
            h = hashlib.blake2b(digest_size=16)
            for k in ("tokens", "targets"):
                h.update(np.asarray(batch[k][r][m], "<i4").tobytes())
            h.update(np.asarray(batch["loss_mask"][r][m] > 0, np.uint8).tobytes())
            row.append(h.digest())
        out.append(row)
    return out


def _stats(path: str) -> list:
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def identity(cfg: Any) -> str:
    """What the cached values depend on: the reference's files, the data files and the data settings."""
    from jaxllama.data.corpus import resolve_files

    t, d = cfg.train, cfg.data
    ref = t.dpo.reference_path or (None if t.lora.rank else t.init_from)
    what = {"reference": _stats(ref) if ref else ["base", _stats(t.init_from) if t.init_from else t.seed,
                                                   t.lora.quantize, t.lora.group_size],
            "data": [_stats(f) for f in resolve_files(d.source)], "settings": {k: v for k, v in vars(d).items()
                                                                            if k not in ("prefetch", "shuffle",
                                                                                         "shuffle_buffer")},
            "model": [cfg.model.dtype, cfg.model.param_dtype]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class CachedSource:
    """A training source whose batches also carry ``ref_logps`` [rows, 2 * pairs] from the table."""

    def __init__(self, source: Any, table: dict[bytes, float], pairs_per_row: int):
        self.source, self.table, self.pairs = source, table, pairs_per_row

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def __iter__(self) -> "CachedSource":
        return self

    def _with_ref(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ref = np.zeros((batch["segment_ids"].shape[0], 2 * self.pairs), np.float32)
        for r, row in enumerate(segment_keys(batch, self.pairs)):
            for s, key in enumerate(row):
                if key is not None:
                    if key not in self.table:
                        raise RunError(f"the DPO reference cache ({FILE}) has no entry for a training sequence: "
                                       "the data changed during the run; delete the file to rebuild it")
                    ref[r, s] = self.table[key]
        return dict(batch, ref_logps=ref)

    def __next__(self) -> dict[str, np.ndarray]:
        return self._with_ref(next(self.source))

    def empty_batch(self) -> dict[str, np.ndarray]:
        return self._with_ref(self.source.empty_batch())


def cached_source(trainer: Any, source: Any, run_dir: Path, say: Callable[[str], None]) -> CachedSource:
    """``source`` with reference log-probabilities: the run's table if it matches, else built now."""
    cfg = trainer.cfg
    if jax.process_count() > 1:
        raise ConfigError("train.dpo.reference=cached runs in one process for now; with several processes use "
                          "train.dpo.reference=base (LoRA) or separate")
    path, ident = run_dir / FILE, identity(cfg)
    pairs = cfg.data.pairs_per_row
    if path.exists():
        with np.load(path) as z:
            if str(z["identity"]) == ident:
                table = dict(zip((bytes(k) for k in z["keys"]), z["values"].tolist()))
                say(f"reference log-probabilities of {len(table):,} sequences read from {path}")
                return CachedSource(source, table, pairs)
        say(f"{path} was computed for another reference or data: computing it again")
    table = build_table(trainer, say)
    tmp = path.with_suffix(".tmp.npz")
    keys = np.frombuffer(b"".join(table), np.uint8).reshape(-1, 16) if table else np.zeros((0, 16), np.uint8)
    np.savez(tmp, keys=keys, values=np.asarray(list(table.values()), np.float32), identity=np.asarray(ident))
    os.replace(tmp, path)
    return CachedSource(source, table, pairs)


def build_table(trainer: Any, say: Callable[[str], None]) -> dict[bytes, float]:
    """One unshuffled pass over the training pairs through the reference: key -> log-probability."""
    from jaxllama.data.sources import make_source
    from jaxllama.model.llama import abstract_params
    from jaxllama.program import reference_arch
    from jaxllama.program.preference import make_reference_logps

    program, cfg = trainer.program, trainer.cfg
    t, d = cfg.train, cfg.data
    start = time.perf_counter()
    ref_params = None
    mode = "base" if t.lora.rank and not t.dpo.reference_path else "separate"
    if mode == "separate":
        from jaxllama.config import reference_weights
        from jaxllama.train.init_from import initial_params

        sh = program.layout.tree_shardings(abstract_params(reference_arch(program.arch)))
        path, key = reference_weights(cfg)
        ref_params = initial_params(cfg, sh, say, path=path, key=key)
    fn = jax.jit(make_reference_logps(program.model, program.arch, d.seq_len, d.pairs_per_row, mode, t.loss_chunk))
    params = trainer.state.model_tree()
    table: dict[bytes, float] = {}
    source = make_source(cfg, one_pass=True)
    try:
        for local in source:
            values = np.asarray(jax.device_get(fn(params, program.batch.to_global(local), ref_params)))
            for r, row in enumerate(segment_keys(local, d.pairs_per_row)):
                for s, key in enumerate(row):
                    if key is not None:
                        table[key] = float(values[r, s])
    finally:
        source.close()
    say(f"reference log-probabilities of {len(table):,} sequences computed in {time.perf_counter() - start:.1f} s "
        f"(train.dpo.reference=cached: no reference pass during training)")
    return table
