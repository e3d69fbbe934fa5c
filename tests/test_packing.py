"""The packer: every target predicted exactly once, documents never share a segment, exact state."""

import numpy as np
import pytest

from helpers import packed_segments
from jaxllama.data.packing import Packer


def _docs(seed=0, n=40, max_len=50):
    rng = np.random.default_rng(seed)
    # ids start at 3 so 0 (pad) never appears inside a document
    return [rng.integers(3, 1000, size=int(rng.integers(1, max_len))).astype(np.int32) for _ in range(n)]


def _drain(p: Packer, rows: int = 4) -> list[dict]:
    out = []
    while len(p.ready) >= rows:
        out.append(p.pop(rows))
    return out


def _segments(batches):
    """(tokens, targets, positions) of every segment in every row, in order."""
    segs = []
    for row, m in packed_segments(batches):
        assert np.all(np.diff(np.nonzero(m)[0]) == 1), "a segment must be contiguous"
        segs.append((row["tokens"][m], row["targets"][m], row["positions"][m]))
    return segs


def test_pack_predicts_every_target_once_within_its_document():
    t = 16
    docs = _docs()
    p = Packer(t, "pack")
    for d in docs:
        p.add(d)
    p.flush()
    batches = _drain(p) + ([p.pop(len(p.ready))] if p.ready else [])
    segs = _segments(batches)
    # Rebuild the expected pieces: a document of n tokens -> pieces of <= t pairs overlapping by one token.
    expected = []
    for d in docs:
        for start in range(0, d.size - 1, t):
            piece = d[start:start + t + 1]
            expected.append((piece[:-1], piece[1:]))
    got = sorted((tuple(a), tuple(b)) for a, b, _ in segs)
    assert got == sorted((tuple(a), tuple(b)) for a, b in expected)
    for tokens, _, pos in segs:
        np.testing.assert_array_equal(pos, np.arange(tokens.size))
    for b in batches:
        np.testing.assert_array_equal(b["loss_mask"], (b["segment_ids"] > 0).astype(np.float32))
        assert np.all(b["tokens"][b["segment_ids"] == 0] == 0)  # padding is pad_id
    real = sum(d.size - 1 for d in docs if d.size >= 2)
    total = sum(b["tokens"].size for b in batches)
    assert p.efficiency == pytest.approx(real / total)
    assert p.efficiency > 0.8  # first-fit over a window keeps padding low on this length mix


def test_short_documents_are_dropped_and_long_ones_split():
    p = Packer(8, "pack")
    p.add(np.array([5], np.int32))
    assert not p.ready and p.fill.size == 0
    doc = np.arange(3, 3 + 20, dtype=np.int32)  # 19 pairs -> pieces of 8, 8, 3
    p.add(doc)
    p.flush()
    b = p.pop(3)
    np.testing.assert_array_equal(b["loss_mask"].sum(1), [8, 8, 3])
    np.testing.assert_array_equal(np.concatenate([b["targets"][0], b["targets"][1], b["targets"][2][:3]]), doc[1:])


def test_concat_reconstructs_the_stream():
    t = 16
    docs = _docs(1)
    p = Packer(t, "concat")
    for d in docs:
        p.add(d)
    batches = _drain(p, 2)
    stream = np.concatenate([d for d in docs if d.size >= 2])
    tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(tokens, stream[:tokens.size])
    np.testing.assert_array_equal(targets, stream[1:tokens.size + 1])
    assert all(np.all(b["segment_ids"] == 1) and np.all(b["loss_mask"] == 1) for b in batches)
    assert p.efficiency == 1.0


@pytest.mark.parametrize("mode", ["pack", "concat"])
def test_state_restore_continues_exactly(mode):
    docs = _docs(2, n=60)
    a = Packer(16, mode)
    for d in docs[:25]:
        a.add(d)
    first = _drain(a, 2)
    state = {k: v.copy() for k, v in a.state().items()}
    for d in docs[25:]:
        a.add(d)
    rest_a = _drain(a, 2)
    b = Packer(16, mode)
    b.restore(state)
    for d in docs[25:]:
        b.add(d)
    rest_b = _drain(b, 2)
    assert first and len(rest_a) == len(rest_b) > 0
    for x, y in zip(rest_a, rest_b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a.efficiency == b.efficiency


def test_restore_rejects_another_seq_len():
    a = Packer(16)
    a.add(np.arange(3, 10, dtype=np.int32))
    with pytest.raises(ValueError, match="rows of"):
        Packer(32).restore(a.state())
