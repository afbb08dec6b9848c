"""Opt-in per-step arrays of a history: optimizer state and the batch's example ids.

- ``optim_<entry>`` `(step, param)` float32: one per-weight optimizer state entry
  (``exp_avg``, ``momentum_buffer``, ...), laid out, chunked and compressed exactly like
  ``params`` (see `ckpt_tools.optim_state`); NaN where the optimizer had no state.
  Created with the group, since writers fill it in the same row blocks as ``params``;
  listed in the group attribute ``optimizer_state``.
- ``batch`` `(step, batch_item)` int64: the example ids of the batch of update *s*, in
  batch order, padded with -1 (no example; also the whole row of a step recorded without
  ids). Its width is the first recorded batch's size; it is created when that batch is
  first written.

Both are written before a row's ``committed`` flag, like every other per-step array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import zarr

from ckpt_tools.store.layout import check_name, row_array_layout

__all__ = [
    "BATCH",
    "OPTIM_PREFIX",
    "batch_width",
    "create_optimizer_arrays",
    "ensure_batch_array",
    "pad_batches",
    "write_batch_rows",
]

OPTIM_PREFIX = "optim_"
BATCH = "batch"
_BATCH_ROWS = 1024  # steps per chunk of `batch`


def create_optimizer_arrays(
    group: zarr.Group, names: Sequence[str], n_steps: int, n_params: int, layout: Mapping
) -> None:
    """Create one ``optim_<name>`` array per entry, in the layout of ``params``."""
    for name in names:
        check_name(name)
        group.create_array(
            OPTIM_PREFIX + name, shape=(n_steps, n_params), dtype="float32",
            fill_value=np.nan, dimension_names=("step", "param"),
            **row_array_layout(n_params, **layout),
        )


def batch_width(group: zarr.Group) -> int | None:
    """The width of the group's ``batch`` array (None while it has none)."""
    return int(group[BATCH].shape[1]) if BATCH in group else None


def ensure_batch_array(group: zarr.Group, width: int) -> zarr.Array:
    """The ``batch`` array, created `width` ids wide if it does not exist yet."""
    if BATCH in group:
        return group[BATCH]
    n_steps = int(group["step"].shape[0])
    return group.create_array(
        BATCH, shape=(n_steps, max(int(width), 1)), chunks=(min(n_steps, _BATCH_ROWS),
                                                            max(int(width), 1)),
        dtype="int64", fill_value=-1, dimension_names=("step", "batch_item"),
    )


def pad_batches(batches: Sequence[Sequence[int] | None], width: int) -> np.ndarray:
    """`(len(batches), width)` int64 ids, each row padded with -1 (all -1 for None)."""
    out = np.full((len(batches), width), -1, dtype=np.int64)
    for i, ids in enumerate(batches):
        if ids is not None:
            out[i, :len(ids)] = ids
    return out


def write_batch_rows(array: zarr.Array, rows: np.ndarray, ids: np.ndarray) -> None:
    """Write `ids` `(len(rows), width)` into `array` at the step indices `rows`."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return
    lo, hi = int(rows.min()), int(rows.max()) + 1
    block = np.asarray(array[lo:hi])
    block[rows - lo] = ids
    array[lo:hi] = block
