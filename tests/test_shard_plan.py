"""The write plan for sharded rows, checked by simulating every rank's copies and sends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_tools.shard_plan import Piece, plan_writes


def fsdp_pieces(shapes: list[tuple[int, ...]], world: int) -> list[list[Piece]]:
    """What `fully_shard` gives each rank: `torch.chunk` of every tensor along dim 0."""
    pieces = [[] for _ in range(world)]
    offset = 0
    for i, shape in enumerate(shapes):
        rows, size = shape[0], int(np.prod(shape))
        per = -(-rows // world)
        for rank in range(world):
            lo, hi = min(rank * per, rows), min((rank + 1) * per, rows)
            if hi > lo:
                width = size // rows
                pieces[rank].append(Piece(i, offset + lo * width, offset + hi * width))
        offset += size
    return pieces


def simulate(pieces: list[list[Piece]], size: int, chunk: int) -> tuple[np.ndarray, list]:
    """Run every rank's plan on the row ``arange(size)``; return the stored row."""
    world = len(pieces)
    plans = [plan_writes(pieces, size, chunk, r) for r in range(world)]
    # Each rank's local tensors, indexed by Piece.tensor (a rank holds one piece each).
    tensors = [{p.tensor: np.arange(p.start, p.stop, dtype=np.float64) for p in ps}
               for ps in pieces]
    rows = [np.full(plan.width, -1.0) for plan in plans]
    for rank, plan in enumerate(plans):
        for t, off, at, n in plan.local:
            rows[rank][at : at + n] = tensors[rank][t][off : off + n]
    for src, plan in enumerate(plans):
        for dst in range(world):
            packed = [tensors[src][t][o : o + n] for t, o, n in plan.send[dst]]
            sent = np.concatenate(packed) if packed else np.zeros(0)
            assert sent.size == plans[dst].receive_sizes[src]
            at_sent = 0
            for at, n in plans[dst].receive[src]:
                rows[dst][at : at + n] = sent[at_sent : at_sent + n]
                at_sent += n
    stored = np.full(size, np.nan)
    writes = np.zeros(size, int)
    for rank, plan in enumerate(plans):
        at = 0
        for lo, hi in plan.columns:
            assert lo % chunk == 0 and (hi % chunk == 0 or hi == size)  # whole chunks only
            stored[lo:hi] = rows[rank][at : at + hi - lo]
            writes[lo:hi] += 1
            at += hi - lo
    assert (writes == 1).all()  # every element written by exactly one rank
    return stored, plans


@st.composite
def partitions(draw):
    size = draw(st.integers(1, 300))
    world = draw(st.integers(1, 4))
    cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=20))) if size > 1 else []
    bounds = [0, *cuts, size]
    pieces = [[] for _ in range(world)]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        pieces[draw(st.integers(0, world - 1))].append(Piece(i, lo, hi))
    return pieces, size, draw(st.integers(1, 64))


@settings(max_examples=200, deadline=None)
@given(partitions())
def test_plan_reassembles_any_partition(case):
    pieces, size, chunk = case
    stored, plans = simulate(pieces, size, chunk)
    np.testing.assert_array_equal(stored, np.arange(size))
    assert len({p.exchange for p in plans}) == 1


def test_fsdp_shards_move_only_pieces_of_shared_chunks():
    # Two large weights and their biases over 3 ranks, uneven (1000 rows do not divide).
    shapes = [(1000, 512), (1000,), (300, 1000), (300,)]
    size, chunk, world = sum(int(np.prod(s)) for s in shapes), 4096, 3
    pieces = fsdp_pieces(shapes, world)
    stored, plans = simulate(pieces, size, chunk)
    np.testing.assert_array_equal(stored, np.arange(size))
    held = [sum(p.stop - p.start for p in ps) for ps in pieces]
    for plan, mine in zip(plans, held, strict=True):
        moved = sum(plan.send_sizes)
        # Every rank writes about a third; what moves is bounded by the shared chunks
        # (at most one per piece boundary), never the shard.
        assert plan.width < size / 2
        assert moved <= 2 * len(shapes) * chunk < mine / 4
    assert sum(p.width for p in plans) == size


def test_a_row_smaller_than_a_chunk_has_one_writer():
    pieces = fsdp_pieces([(7, 5), (7,), (3, 7)], 3)
    stored, plans = simulate(pieces, 63, 1 << 18)
    np.testing.assert_array_equal(stored, np.arange(63))
    assert [p.width for p in plans] == [63, 0, 0]  # rank 0 covers most of the one chunk
    assert plans[0].exchange


def test_chunks_inside_one_shard_need_no_exchange():
    pieces = [[Piece(0, 0, 64)], [Piece(0, 64, 128)]]
    _, plans = simulate(pieces, 128, 32)
    assert not any(p.exchange for p in plans)
    assert [p.columns for p in plans] == [((0, 64),), ((64, 128),)]


@pytest.mark.parametrize("pieces, message", [
    ([[Piece(0, 0, 6)], [Piece(0, 4, 10)]], "overlap"),
    ([[Piece(0, 0, 4)], [Piece(0, 5, 10)]], "gap"),
    ([[Piece(0, 0, 4)], [Piece(0, 4, 8)]], "cover 8 of 10"),
])
def test_bad_cover_is_refused(pieces, message):
    with pytest.raises(ValueError, match=message):
        plan_writes(pieces, 10, 4, 0)
