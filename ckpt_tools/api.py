"""Reading a store back: lazy xarray views and `state_dict`s for rewinding."""

from __future__ import annotations

from pathlib import Path

import torch
import xarray as xr

from ckpt_tools import store
from ckpt_tools.tensors import split_row

__all__ = ["load_state_dict", "open_history", "open_store"]


def open_store(path: str | Path) -> xr.DataTree:
    """Open a store lazily (dask arrays) as an `xarray.DataTree`.

    Every history group (``/train``, IMP levels, experiments) is a node whose dataset
    has dimensions ``step``, ``param``, ``buffer``, ``layer`` (and ``eval_step`` where
    evaluation was recorded); only committed steps are shown.

    Raises:
        StoreError: if `path` is not a readable ckpt-tools store.
    """
    return store.open_tree(path)


def open_history(path: str | Path, group: str = "train") -> xr.Dataset:
    """Open one recorded history lazily as an `xarray.Dataset` (committed steps only).

    Raises:
        StoreError: if the store or the group is missing or not a history.
    """
    return store.open_history(path, group)


def load_state_dict(
    path: str | Path, step: int, *, group: str = "train"
) -> dict[str, torch.Tensor]:
    """The parameters and buffers stored at `step`, as `model.load_state_dict` takes them.

    Values are bit-exact copies of what was recorded; integer buffers (BatchNorm's
    ``num_batches_tracked``) come back in their own dtype.

    Raises:
        StoreError: if `step` is not stored (the message lists the nearest stored steps).
    """
    params, buffers, p_specs, b_specs = store.read_row(path, step, group=group)
    return {**split_row(params, p_specs), **split_row(buffers, b_specs)}
