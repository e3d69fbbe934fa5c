"""A synthetic source that needs no files and no TensorFlow: a seeded sparse Markov chain.

Every token has ``branching`` possible successors, drawn Zipf-like from the vocabulary, so a
model can learn the chain down to about ln(branching) nats while random weights start near
ln(vocab): a real, visible learning signal for the tests (``data.source=synthetic``), and free
input for benchmarks and machines without TensorFlow. Batch ``i`` depends only on (seed, i), so the
position in the stream is just the number of batches taken.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxllama.errors import RunError

LANGUAGE_SEED = 1234  # the chain itself is fixed; train.seed only changes which paths are sampled


class SyntheticSource:
    """Yields this process's rows of each global batch (:mod:`jaxllama.data.batch`'s arrays)."""

    tok = None  # no tokenizer: ids are the model's vocabulary
    efficiency = None  # no packing
    bad = None  # no records to be bad

    def describe(self) -> str:
        return f"data: synthetic tokens (a random Zipf-like language, seed {self.seed}), {self.seq_len}-token rows"

    def __init__(self, vocab_size: int, seq_len: int, global_batch: int, seed: int = 0, branching: int = 4,
                 process_index: int = 0, process_count: int = 1, limit: int | None = None):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.vocab_size, self.seq_len, self.global_batch, self.seed = vocab_size, seq_len, global_batch, seed
        self.local_rows = slice(process_index * global_batch // process_count,
                                (process_index + 1) * global_batch // process_count)
        rng = np.random.default_rng(LANGUAGE_SEED)
        # Successors follow a Zipf-like law, as words do: frequent tokens are learned first (the
        # loss falls early), the rare transitions later.
        zipf = 1.0 / (np.arange(vocab_size) + 10.0)
        self.successors = rng.choice(vocab_size, size=(vocab_size, branching), p=zipf / zipf.sum())
        self.position = 0
        self.limit = limit  # batches before StopIteration (eval); None: endless

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Global batch ``index`` (all rows), deterministic."""
        rng = np.random.default_rng([self.seed, index])
        b, t = self.global_batch, self.seq_len
        seq = np.empty((b, t + 1), np.int32)
        seq[:, 0] = rng.integers(0, self.vocab_size, size=b)
        choice = rng.integers(0, self.successors.shape[1], size=(b, t))
        for i in range(t):
            seq[:, i + 1] = self.successors[seq[:, i], choice[:, i]]
        return dict(tokens=seq[:, :-1], targets=seq[:, 1:], segment_ids=np.ones((b, t), np.int32),
                    positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                    loss_mask=np.ones((b, t), np.float32))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.limit is not None and self.position >= self.limit:
            raise StopIteration
        out = {k: v[self.local_rows] for k, v in self.batch(self.position).items()}
        self.position += 1
        return out

    def empty_batch(self) -> dict[str, np.ndarray]:
        """This process's rows of a batch with nothing to learn (loss_mask 0)."""
        return {k: np.zeros_like(v[self.local_rows]) for k, v in self.batch(0).items()}

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        position = state.get("position") if isinstance(state, dict) else None
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise RunError(f"data state: position {str(position)[:40]!r} is not a batch count")
        self.position = position

    def close(self) -> None:
        pass
