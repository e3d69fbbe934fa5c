"""An Orbax handler for state that differs per process: the input pipeline's position.

Every process writes its own ``process_<i>-of-<n>.json`` into the item directory and reads back
only its own file, the pattern Grain's checkpoint handler uses. The JSON state of a data source is
small (a counter, or a few hundred KB of packer rows), so it is written synchronously; the commit
future keeps Orbax's async bookkeeping uniform.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def process_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


class PerProcessJsonHandler(ocp.AsyncCheckpointHandler):
    """Saves one JSON object per process; restores this process's object."""

    async def _write(self, state: dict, directory: epath.Path) -> None:
        (directory / process_file(jax.process_index(), jax.process_count())).write_text(json.dumps(state))

    async def async_save(self, directory: epath.Path, args: "PerProcessJsonSave") -> list:
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(args.state, directory),
                                                                 name="per_process_json_save")]

    def save(self, directory: epath.Path, args: "PerProcessJsonSave") -> None:
        (directory / process_file(jax.process_index(), jax.process_count())).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "PerProcessJsonRestore | None" = None) -> dict:
        path = directory / process_file(jax.process_index(), jax.process_count())
        if not path.exists():
            others = sorted(p.name for p in directory.glob("process_*.json"))
            raise FileNotFoundError(f"{path} not found (the checkpoint holds {', '.join(others) or 'no files'}; "
                                    f"it was written by a different number of processes)")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> Any:
        return None


@ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
    pass
