"""Reading a store back: lazy xarray views and `state_dict`s for rewinding."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import xarray as xr

from ckpt_tools import store
from ckpt_tools.tensors import split_row

__all__ = ["load_state_dict", "open_history", "open_store"]


def open_store(
    path: str | Path | store.Location, *, storage_options: Mapping[str, Any] | None = None
) -> xr.DataTree:
    """Open a store lazily (dask arrays) as an `xarray.DataTree`.

    `path` is a local path, an ``s3://bucket/prefix/run.zarr`` URL or any other fsspec URL
    (read-only, e.g. ``https://``); `storage_options` go to its file system (for s3fs:
    ``endpoint_url``, ``key``, ``secret``, ...), on top of the AWS environment variables.

    Every history group (``/train``, IMP levels, experiments) is a node whose dataset
    has dimensions ``step``, ``param``, ``buffer``, ``layer`` (and ``eval_step`` where
    evaluation was recorded); only committed steps are shown.

    Raises:
        StoreError: if `path` is not a readable ckpt-tools store.
    """
    return store.open_tree(store.as_location(path, storage_options))


def open_history(
    path: str | Path | store.Location, group: str = "train", *,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Open one recorded history lazily as an `xarray.Dataset` (committed steps only).

    `path` and `storage_options` as for `open_store`.

    Raises:
        StoreError: if the store or the group is missing or not a history.
    """
    return store.open_history(store.as_location(path, storage_options), group)


def load_state_dict(
    path: str | Path | store.Location, step: int, *, group: str = "train",
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The parameters and buffers stored at `step`, as `model.load_state_dict` takes them.

    `path` and `storage_options` as for `open_store`.

    Values are bit-exact copies of what was recorded; integer buffers (BatchNorm's
    ``num_batches_tracked``) come back in their own dtype.

    Raises:
        StoreError: if `step` is not stored (the message lists the nearest stored steps).
    """
    params, buffers, p_specs, b_specs = store.read_row(
        store.as_location(path, storage_options), step, group=group)
    return {**split_row(params, p_specs), **split_row(buffers, b_specs)}
