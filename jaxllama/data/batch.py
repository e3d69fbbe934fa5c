"""The batch format: the one list of the arrays a training/eval batch holds, and their dtypes.

Every batch is a dict of ``[rows, seq_len]`` arrays with exactly these keys. ``segment_ids`` 0 and
``loss_mask`` 0 mark padding; ``positions`` restart at 0 in each packed document. The sources
here produce them, :class:`jaxllama.program.BatchSpec` shards and assembles them.
"""

from __future__ import annotations

import numpy as np

BATCH_DTYPES: dict[str, type] = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32,
                                 "positions": np.int32, "loss_mask": np.float32}
BATCH_KEYS = tuple(BATCH_DTYPES)
ROW_KEYS = BATCH_KEYS  # what a packer stores per row (loss_mask: 1 where the target is trained)
