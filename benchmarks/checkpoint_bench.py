"""How long a checkpoint save blocks training (async vs blocking), and save/restore throughput.

    python benchmarks/checkpoint_bench.py                                   # tiny
    python benchmarks/checkpoint_bench.py model.preset=llama3.2-1b model.n_layers=2

Builds the sharded train state (parameters + AdamW moments) on 8 simulated CPU devices, then,
in the same process and on the same state, times with jaxllama's TrainCheckpoints:

- async save: the seconds ``save()`` blocks the caller (what the training loop loses), and the
  seconds until the checkpoint is complete;
- blocking save (``checkpoint.async_save=false``): the seconds ``save()`` takes;
- restore of the latest checkpoint into the same shardings.

Each figure is the median of ``--repeats`` saves to a fresh directory; throughput is the state's
bytes over the time. The async block time is reported as a ratio against the blocking save (the
peer measured in the same run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxllama.checkpoint.manager import TrainCheckpoints  # noqa: E402
from jaxllama.config import load_config  # noqa: E402
from jaxllama.train.loop import Trainer  # noqa: E402


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def time_saves(trainer: Trainer, cfg, root: str, async_save: bool, repeats: int) -> tuple[list, list, list]:
    """(blocked_s, complete_s, restore_s) per repeat, each into a fresh directory."""
    blocked, complete, restore = [], [], []
    cfg.checkpoint.async_save = async_save
    for r in range(repeats):
        d = os.path.join(root, f"{'async' if async_save else 'sync'}-{r}")
        ckpts = TrainCheckpoints(d, cfg.checkpoint, say=lambda _: None)
        jax.block_until_ready(trainer.state)
        start = time.perf_counter()
        blocked.append(ckpts.save(1, trainer.state, cfg, {"position": 1}))
        ckpts.mngr.wait_until_finished()
        complete.append(time.perf_counter() - start)
        ckpts.close()
        reader = TrainCheckpoints(d, cfg.checkpoint, say=lambda _: None)
        start = time.perf_counter()
        _, restored, _ = reader.restore_latest(trainer.state, trainer.state_shardings, cfg.model)
        jax.block_until_ready(restored)
        restore.append(time.perf_counter() - start)
        reader.close()
        del restored
        shutil.rmtree(d)
    return blocked, complete, restore


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.preset=llama3.2-1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)
    cfg = load_config(None, ["model.preset=tiny", "data.source=synthetic", *args.overrides])
    trainer = Trainer.build(cfg)
    mb = state_bytes(trainer.state) / 1e6
    n_params = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    root = tempfile.mkdtemp(prefix="jaxllama-ckpt-bench-", dir=args.dir)
    try:
        a_block, a_done, a_restore = time_saves(trainer, cfg, root, True, args.repeats)
        s_block, _, s_restore = time_saves(trainer, cfg, root, False, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    print(f"model {cfg.model.preset} ({' '.join(args.overrides) or 'defaults'}): {n_params / 1e6:.1f}M params, "
          f"train state {mb:,.0f} MB on {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"median of {args.repeats}")
    print(f"  async save blocks the loop {med(a_block):.3f} s, complete after {med(a_done):.3f} s")
    print(f"  blocking save             {med(s_block):.3f} s  ({mb / med(s_block):,.0f} MB/s)")
    print(f"  restore                   {med(a_restore + s_restore):.3f} s  "
          f"({mb / med(a_restore + s_restore):,.0f} MB/s)")
    print(f"  async block / blocking save = {med(a_block) / med(s_block):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
