"""What every analysis takes: a recorded history, given as a path, a tree node or a Dataset."""

from __future__ import annotations

import os

import xarray as xr

from ckpt_tools.api import open_history
from ckpt_tools.store import ATTRS_KEY, Location, StoreError
from ckpt_tools.tensors import TensorSpec, specs_from_json

__all__ = [
    "History",
    "NotApplicable",
    "as_history",
    "buffer_table",
    "param_table",
    "select_layers",
]

History = str | os.PathLike | xr.DataTree | xr.Dataset
"""A store path (its ``train`` history), a `DataTree` node of a history, or its Dataset."""

WEIGHTS = ("prunable", "all")


class NotApplicable(ValueError):
    """The analysis does not apply to this history (e.g. no built-in model to rebuild)."""


def as_history(history: History) -> xr.Dataset:
    """The history Dataset (lazy, committed steps only when opened from a path).

    Raises:
        StoreError: the path is not a store with a ``train`` history, or the object is
            not a recorded history.
        TypeError: `history` is none of the accepted types.
    """
    if isinstance(history, str | os.PathLike | Location):
        return open_history(history, "train")
    if isinstance(history, xr.DataTree):
        ds = history.to_dataset(inherit=False)
        where = f"node '{history.path}'"
    elif isinstance(history, xr.Dataset):
        ds, where = history, "the Dataset"
    else:
        raise TypeError(f"expected a store path, a DataTree node or a Dataset, got "
                        f"{type(history).__name__}")
    meta = ds.attrs.get(ATTRS_KEY)
    if not isinstance(meta, dict) or meta.get("kind") != "history" or "params" not in ds:
        raise StoreError(f"{where} is not a recorded history (pick one, e.g. tree['train'])")
    return ds


def param_table(ds: xr.Dataset) -> list[TensorSpec]:
    """The parameter tensors of a history, in their order along ``param``.

    Raises:
        StoreError: the table does not tile the ``param`` dimension (a subset Dataset).
    """
    specs = specs_from_json(ds.attrs[ATTRS_KEY]["params"])
    _check_tiles(specs, ds.sizes.get("param", 0), "param")
    return specs


def buffer_table(ds: xr.Dataset) -> list[TensorSpec]:
    """The buffers of a history, in their order along ``buffer``."""
    specs = specs_from_json(ds.attrs[ATTRS_KEY]["buffers"])
    _check_tiles(specs, ds.sizes.get("buffer", 0), "buffer")
    return specs


def _check_tiles(specs: list[TensorSpec], width: int, dim: str) -> None:
    stop = 0
    for s in specs:
        if s.offset != stop:
            break
        stop = s.stop
    if stop != width:
        raise StoreError(f"the tensor table does not cover the '{dim}' dimension ({stop} of "
                         f"{width}); pass the whole history, not a subset along '{dim}'")


def select_layers(specs: list[TensorSpec], weights: str) -> list[int]:
    """Indices of the tensors an analysis covers.

    `weights` is ``"prunable"`` (conv and linear weights) or ``"all"`` parameters.

    Raises:
        ValueError: unknown `weights`, or no tensor selected.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    chosen = [i for i, s in enumerate(specs) if s.size and (weights == "all" or s.prunable)]
    if not chosen:
        raise ValueError(f"the history has no {weights} weights; try weights='all'")
    return chosen
