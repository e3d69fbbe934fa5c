"""Documents of token ids -> fixed-length training rows (pure numpy, no TensorFlow).

Two modes:

* ``pack``: each document (split into ``seq_len``-sized pieces when longer) goes whole into one
  row; rows hold several documents told apart by ``segment_ids`` (1, 2, ...), positions restart at
  0 in each segment, and the unused tail is padding (segment 0, ``loss_mask`` 0). Attention and
  the loss never cross a document. Pieces go first-fit into a small window of open rows, which
  keeps padding low without reordering much.
* ``concat``: documents are concatenated into one stream and cut into rows (GPT style); no
  padding, attention runs across document boundaries.

Every token after the first of a document is predicted exactly once: a document of n tokens gives
n - 1 (input, target) pairs, and a long document's pieces overlap by one token. A document may carry
a per-token mask (chat fine-tuning: only assistant tokens are trained); the pair that predicts token
j gets ``loss_mask = mask[j]``, wherever packing puts it.

The packer's whole state is a few arrays (:meth:`Packer.state`), so a pipeline resumes exactly.
"""

from __future__ import annotations

import numpy as np

from jaxllama.data.batch import BATCH_DTYPES, ROW_KEYS


class Packer:
    """Accumulates documents with :meth:`add`; complete rows come out of :meth:`pop`."""

    def __init__(self, seq_len: int, mode: str = "pack", pad_id: int = 0, window: int = 8, max_segments: int = 0):
        """``max_segments``: a row holding that many documents is complete (0: no limit); preference
        pairs use it so that the loss can sum each sequence over a fixed number of segments."""
        if mode not in ("pack", "concat"):
            raise ValueError(f"packing mode {mode!r}")
        self.seq_len, self.mode, self.pad_id, self.window = seq_len, mode, pad_id, window
        self.max_segments = max_segments
        self.open = self._empty(0)  # rows still being filled: arrays [k, seq_len]
        self.fill = np.zeros(0, np.int64)  # tokens used in each open row
        self.nseg = np.zeros(0, np.int64)  # segments in each open row
        self.ready: list[dict[str, np.ndarray]] = []  # finished rows, in order
        self.stream = np.zeros(0, np.int32)  # concat mode: tokens not yet in a row
        self.stream_mask = np.zeros(0, np.float32)  # and whether each is trained
        self.real_tokens = 0  # non-pad tokens in rows handed out
        self.total_tokens = 0

    def _empty(self, k: int) -> dict[str, np.ndarray]:
        t = self.seq_len
        return {"tokens": np.full((k, t), self.pad_id, np.int32), "targets": np.full((k, t), self.pad_id, np.int32),
                "segment_ids": np.zeros((k, t), np.int32), "positions": np.zeros((k, t), np.int32),
                "loss_mask": np.zeros((k, t), np.float32)}

    # -- input ---------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """One document's token ids (BOS/EOS already added as wanted) and optionally which of its tokens
        are trained as targets (default: all). Fewer than 2 tokens: nothing to learn."""
        ids = np.asarray(ids, np.int32)
        mask = np.ones(ids.size, np.float32) if mask is None else np.asarray(mask, np.float32)
        if ids.size < 2:
            return
        if self.mode == "concat":
            self.stream = np.concatenate([self.stream, ids])
            self.stream_mask = np.concatenate([self.stream_mask, mask])
            t = self.seq_len
            n_rows = (self.stream.size - 1) // t
            for r in range(n_rows):
                piece, m = self.stream[r * t: r * t + t + 1], self.stream_mask[r * t: r * t + t + 1]
                self.ready.append({"tokens": piece[:-1].copy(), "targets": piece[1:].copy(),
                                   "segment_ids": np.ones(t, np.int32), "positions": np.arange(t, dtype=np.int32),
                                   "loss_mask": m[1:].copy()})
            self.stream, self.stream_mask = self.stream[n_rows * t:], self.stream_mask[n_rows * t:]
            return
        for start in range(0, ids.size - 1, self.seq_len):
            self._place(ids[start: start + self.seq_len + 1], mask[start: start + self.seq_len + 1])

    def add_pair(self, ids_a: np.ndarray, mask_a: np.ndarray, ids_b: np.ndarray, mask_b: np.ndarray) -> None:
        """Two documents that must share a row as consecutive segments (a preference pair: chosen as
        segment 2k + 1, rejected as 2k + 2). Together they must fit in a row (the encoder cuts them)."""
        if self.mode != "pack":
            raise ValueError("preference pairs need packing mode 'pack'")
        pieces = [(np.asarray(i, np.int32), np.asarray(m, np.float32)) for i, m in ((ids_a, mask_a), (ids_b, mask_b))]
        need = sum(p.size - 1 for p, _ in pieces)
        if need > self.seq_len or min(p.size for p, _ in pieces) < 2:
            raise ValueError(f"a pair of {need} positions does not fit a row of {self.seq_len}")
        row = self._row_for(need)
        for piece, mask in pieces:
            self._write(row, piece, mask)
        self._maybe_retire(row)

    def _row_for(self, n: int) -> int:
        """An open row with ``n`` free positions (first fit), opening one (and retiring the fullest when
        the window is full) if none has."""
        free = self.seq_len - self.fill
        fits = np.nonzero(free >= n)[0]
        if fits.size:
            return int(fits[0])
        if self.fill.size >= self.window:  # window full: retire the fullest row to make room
            self._retire(int(np.argmax(self.fill)))
        self._open_row()
        return self.fill.size - 1

    def _maybe_retire(self, row: int) -> None:
        if self.fill[row] == self.seq_len or (self.max_segments and self.nseg[row] >= self.max_segments):
            self._retire(row)

    def _place(self, piece: np.ndarray, mask: np.ndarray) -> None:
        row = self._row_for(piece.size - 1)
        self._write(row, piece, mask)
        self._maybe_retire(row)

    def _write(self, row: int, piece: np.ndarray, mask: np.ndarray) -> None:
        n = piece.size - 1  # (input, target) pairs in this piece
        a, b = int(self.fill[row]), int(self.fill[row]) + n
        self.nseg[row] += 1
        self.open["tokens"][row, a:b] = piece[:-1]
        self.open["targets"][row, a:b] = piece[1:]
        self.open["segment_ids"][row, a:b] = self.nseg[row]
        self.open["positions"][row, a:b] = np.arange(n, dtype=np.int32)
        self.open["loss_mask"][row, a:b] = mask[1:]
        self.fill[row] = b

    def _open_row(self) -> None:
        new = self._empty(1)
        self.open = {k: np.concatenate([self.open[k], new[k]]) for k in ROW_KEYS}
        self.fill = np.append(self.fill, 0)
        self.nseg = np.append(self.nseg, 0)

    def _retire(self, row: int) -> None:
        self.ready.append({k: self.open[k][row].copy() for k in ROW_KEYS})
        keep = np.arange(self.fill.size) != row
        self.open = {k: v[keep] for k, v in self.open.items()}
        self.fill, self.nseg = self.fill[keep], self.nseg[keep]

    def flush(self) -> None:
        """End of a finite stream: open rows become ready (padded); a concat tail becomes a padded row."""
        while self.fill.size:
            self._retire(0)
        if self.mode == "concat" and self.stream.size >= 2:
            n = self.stream.size - 1  # < seq_len: full rows were cut as the stream grew
            row = self._empty(1)
            row = {k: v[0] for k, v in row.items()}
            row["tokens"][:n], row["targets"][:n] = self.stream[:-1], self.stream[1:]
            row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
            row["loss_mask"][:n] = self.stream_mask[1:]
            self.ready.append(row)
        self.stream, self.stream_mask = np.zeros(0, np.int32), np.zeros(0, np.float32)

    # -- output --------------------------------------------------------------------------------

    def pop(self, n: int) -> dict[str, np.ndarray]:
        """The next ``n`` ready rows as a batch with ``loss_mask``; fewer ready rows are padded."""
        rows, self.ready = self.ready[:n], self.ready[n:]
        rows += [{k: v[0] for k, v in self._empty(1).items()} for _ in range(n - len(rows))]
        batch = {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}
        self.real_tokens += int((batch["segment_ids"] > 0).sum())
        self.total_tokens += batch["segment_ids"].size
        return batch

    @property
    def efficiency(self) -> float:
        """Fraction of handed-out row slots holding real tokens (1.0 before any row)."""
        return self.real_tokens / self.total_tokens if self.total_tokens else 1.0

    # -- exact resume --------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that describe the packer completely (copies: later adds do not change them)."""
        ready = {k: np.stack([r[k] for r in self.ready]) if self.ready else np.zeros((0, self.seq_len), BATCH_DTYPES[k])
                 for k in ROW_KEYS}
        out = {f"open_{k}": v.copy() for k, v in self.open.items()}
        out.update({f"ready_{k}": v for k, v in ready.items()})
        out.update(fill=self.fill.copy(), nseg=self.nseg.copy(), stream=self.stream.copy(),
                   stream_mask=self.stream_mask.copy(), counts=np.array([self.real_tokens, self.total_tokens], np.int64))
        return out

    def restore(self, state: dict[str, np.ndarray]) -> None:
        if state["open_tokens"].shape[1:] != (self.seq_len,):
            raise ValueError(f"packer state has rows of {state['open_tokens'].shape[1:]}, expected ({self.seq_len},)")
        state = dict(state)
        for where in ("open", "ready"):  # a state saved before masks were kept: every real token was trained
            state.setdefault(f"{where}_loss_mask", (state[f"{where}_segment_ids"] > 0).astype(np.float32))
        state.setdefault("stream_mask", np.ones(state["stream"].shape, np.float32))
        self.open = {k: np.array(state[f"open_{k}"], BATCH_DTYPES[k]) for k in ROW_KEYS}
        n_ready = state["ready_tokens"].shape[0]
        self.ready = [{k: np.array(state[f"ready_{k}"][i], BATCH_DTYPES[k]) for k in ROW_KEYS} for i in range(n_ready)]
        self.fill, self.nseg = np.array(state["fill"], np.int64), np.array(state["nseg"], np.int64)
        self.stream = np.array(state["stream"], np.int32)
        self.stream_mask = np.array(state["stream_mask"], np.float32)
        self.real_tokens, self.total_tokens = (int(x) for x in state["counts"])
