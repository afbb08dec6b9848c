"""Per-rank write flags: how a row written by several processes becomes committed.

When a sharded model is recorded, every rank writes its own chunks of a row (see
`ckpt_tools.shard_plan`), so no single process knows when the row is whole. Each rank
says so in the store: the history group holds ::

    part_written   (step, rank)   int64, chunked (n_steps, 1): one chunk file per rank

and rank `r` writes its column only (its own chunk: no two processes ever write one
file). A value is the *session* (generation) number of the recording that wrote that
part; rank 0 opens every session with a number larger than any stored one. Rank 0
commits a row (sets `committed`) once every rank's flag for it holds the current session,
so a part left by a killed earlier session never counts for a row rewritten now.
"""

from __future__ import annotations

import numpy as np
import zarr

__all__ = ["PART_ARRAY", "mark_parts", "ready_rows", "start_session"]

PART_ARRAY = "part_written"
"""Name of the per-rank flags array in a history group (hidden from xarray views)."""


def start_session(group: zarr.Group, world: int) -> int:
    """Make sure `group` has flags for `world` ranks; return a fresh session number.

    Call it on rank 0 only, under the group's writer lock, before the other ranks write.
    Flags stored for another number of ranks are dropped (their rows are rewritten).
    """
    n_steps = group["step"].shape[0]
    if PART_ARRAY in group and group[PART_ARRAY].shape == (n_steps, world):
        flags = group[PART_ARRAY]
        return int(np.max(flags[:], initial=0)) + 1
    if PART_ARRAY in group:
        del group[PART_ARRAY]
    group.create_array(
        PART_ARRAY, shape=(n_steps, world), chunks=(max(n_steps, 1), 1), dtype="int64",
        fill_value=0, dimension_names=("step", "rank"),
    )
    return 1


def mark_parts(group: zarr.Group, rows: np.ndarray, rank: int, session: int) -> None:
    """Record that `rank` has written its part of `rows` (indices along `step`)."""
    rows = np.asarray(rows)
    if rows.size == 0:
        return
    lo, hi = int(rows.min()), int(rows.max()) + 1
    flags = group[PART_ARRAY]
    column = np.asarray(flags[lo:hi, rank], dtype=np.int64)
    column[rows - lo] = session
    flags[lo:hi, rank] = column


def ready_rows(group: zarr.Group, session: int) -> np.ndarray:
    """Rows whose parts every rank has written in `session` and that are not committed."""
    flags = np.asarray(group[PART_ARRAY][:])
    done = np.asarray(group["committed"][:], dtype=bool)
    return np.flatnonzero((flags == session).all(axis=1) & ~done)
