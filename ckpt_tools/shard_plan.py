"""Who writes which chunks of the flat `param` axis when every rank holds a shard.

Under FSDP2 each parameter is split along its first dimension, so every rank covers one
contiguous interval of each parameter's stretch of the flat row: many small intervals,
interleaved across ranks. Storage chunks span `chunk` elements of that axis, and a chunk
is compressed whole, so it must have exactly one writer (two processes writing one chunk
lose each other's updates). The plan gives each chunk to the rank that covers most of it;
the other ranks send that rank their pieces of the chunk. Only pieces inside chunks that
several ranks cover move, never a rank's whole shard: for a model much larger than a
chunk per tensor, that is a small fraction of the row; for a model smaller than one chunk,
the whole (small) row is one chunk and one rank writes it.

Pure bookkeeping on integers: no torch, no Zarr. `ckpt_tools.sharded` does the copies and
the exchange.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Piece", "ShardPlan", "plan_writes"]


@dataclass(frozen=True)
class Piece:
    """A stretch of the flat axis that one rank holds as part of one local tensor.

    Attributes:
        tensor: Index of the local tensor (in the holding rank's own list).
        start: First element along the flat axis.
        stop: One past the last element.
    """

    tensor: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    """What one rank copies, sends, receives and writes for every row.

    Positions in "the rank's row" count along its written columns: the concatenation of
    `columns`, in order.

    Attributes:
        rank: The rank this plan is for.
        owners: `(n_chunks,)` the rank that writes each chunk.
        columns: The `(start, stop)` runs of the flat axis this rank writes, chunk-aligned.
        local: `(tensor, offset in tensor, position in row, length)` copies from this
            rank's own tensors into its row.
        send: One list per destination rank of `(tensor, offset in tensor, length)`,
            packed in this order.
        receive: One list per source rank of `(position in row, length)`, in the order
            the source packs them.
        exchange: Whether any rank sends anything (the same on every rank): when False,
            rows need no collective at all.
    """

    rank: int
    owners: np.ndarray
    columns: tuple[tuple[int, int], ...]
    local: tuple[tuple[int, int, int, int], ...]
    send: tuple[tuple[tuple[int, int, int], ...], ...]
    receive: tuple[tuple[tuple[int, int], ...], ...]
    exchange: bool

    @property
    def width(self) -> int:
        """Elements of one row that this rank writes."""
        return sum(hi - lo for lo, hi in self.columns)

    @property
    def send_sizes(self) -> list[int]:
        """Elements sent to each rank per row."""
        return [sum(n for *_, n in items) for items in self.send]

    @property
    def receive_sizes(self) -> list[int]:
        """Elements received from each rank per row."""
        return [sum(n for _, n in items) for items in self.receive]


def _check_cover(pieces: Sequence[Sequence[Piece]], size: int) -> None:
    spans = sorted((p.start, p.stop, r) for r, ps in enumerate(pieces) for p in ps)
    at = 0
    for start, stop, rank in spans:
        if start != at or stop <= start:
            what = "overlap" if start < at else "leave a gap"
            raise ValueError(f"the ranks' shards {what} at element {min(start, at)} of "
                             f"{size} (rank {rank}); each element needs exactly one holder")
        at = stop
    if at != size:
        raise ValueError(f"the ranks' shards cover {at} of {size} elements")


def _owners(pieces: Sequence[Sequence[Piece]], size: int, chunk: int) -> np.ndarray:
    n_chunks = -(-size // chunk)
    cover = np.zeros((len(pieces), n_chunks), np.int64)
    edges = np.arange(n_chunks + 1, dtype=np.int64) * chunk
    for rank, ps in enumerate(pieces):
        for p in ps:
            first, last = p.start // chunk, (p.stop - 1) // chunk
            ks = np.arange(first, last + 1)
            cover[rank, ks] += np.minimum(edges[ks + 1], p.stop) - np.maximum(edges[ks], p.start)
    return np.argmax(cover, axis=0)  # ties go to the lowest rank


def _runs(owned: np.ndarray, size: int, chunk: int) -> tuple[tuple[int, int], ...]:
    ks = np.flatnonzero(owned)
    if ks.size == 0:
        return ()
    breaks = np.flatnonzero(np.diff(ks) > 1)
    firsts = np.r_[ks[0], ks[breaks + 1]]
    lasts = np.r_[ks[breaks], ks[-1]]
    return tuple((int(a) * chunk, min(int(b + 1) * chunk, size)) for a, b in zip(firsts, lasts,
                                                                                 strict=True))


def _segments(piece: Piece, owners: np.ndarray, chunk: int):
    """Split `piece` where the owning rank changes: yields (owner, start, stop)."""
    at = piece.start
    while at < piece.stop:
        owner = owners[at // chunk]
        k = at // chunk + 1
        while k * chunk < piece.stop and owners[k] == owner:
            k += 1
        stop = min(k * chunk, piece.stop)
        yield int(owner), at, stop
        at = stop


def plan_writes(pieces: Sequence[Sequence[Piece]], size: int, chunk: int, rank: int) -> ShardPlan:
    """Plan `rank`'s part of writing rows of `size` elements chunked by `chunk`.

    Args:
        pieces: For every rank, the pieces it holds; together they must cover
            ``range(size)`` exactly once.
        size: Length of the flat axis.
        chunk: Chunk length along it.
        rank: The rank to plan for.

    Raises:
        ValueError: the pieces overlap or leave a gap.
    """
    world = len(pieces)
    _check_cover(pieces, size)
    if size == 0:
        empty = tuple(() for _ in range(world))
        return ShardPlan(rank, np.zeros(0, np.int64), (), (), empty, empty, False)
    owners = _owners(pieces, size, chunk)
    columns = _runs(owners == rank, size, chunk)
    starts = np.array([lo for lo, _ in columns], np.int64)
    ends_at = np.cumsum([hi - lo for lo, hi in columns]) if columns else np.zeros(0, np.int64)
    base = ends_at - np.array([hi - lo for lo, hi in columns], np.int64)

    def position(index: int) -> int:
        run = int(np.searchsorted(starts, index, side="right")) - 1
        return int(base[run] + index - starts[run])

    local, send = [], [[] for _ in range(world)]
    receive = [[] for _ in range(world)]
    exchange = False
    for source, ps in enumerate(pieces):
        for p in sorted(ps, key=lambda q: q.start):
            for owner, lo, hi in _segments(p, owners, chunk):
                exchange |= owner != source
                if source == rank and owner == rank:
                    local.append((p.tensor, lo - p.start, position(lo), hi - lo))
                elif source == rank:
                    send[owner].append((p.tensor, lo - p.start, hi - lo))
                elif owner == rank:
                    receive[source].append((position(lo), hi - lo))
    return ShardPlan(
        rank=rank, owners=owners, columns=columns, local=tuple(local),
        send=tuple(tuple(s) for s in send), receive=tuple(tuple(r) for r in receive),
        exchange=exchange,
    )
