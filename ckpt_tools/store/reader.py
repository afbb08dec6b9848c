"""Reading stores: validated, lazy xarray views and single rows for rewinding."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ckpt_tools.store.layout import ATTRS_KEY, FORMAT_VERSION, StoreError, check_group_name
from ckpt_tools.tensors import TensorSpec, specs_from_json

__all__ = [
    "history_groups",
    "open_history",
    "open_tree",
    "read_row",
    "read_root",
    "store_info",
]


def read_root(path: str | Path) -> zarr.Group:
    """Open the root group read-only after checking it is a ckpt-tools store.

    Raises:
        StoreError: missing path, not a Zarr v3 store, not ours, or a newer format.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist; pass the path of a recorded store (RUN.zarr)")
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not a Zarr v3 store (no zarr.json); is it the right path?")
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        meta = root.attrs.get(ATTRS_KEY)
    except Exception as exc:  # corrupt or truncated metadata
        raise StoreError(f"{path}: unreadable store metadata ({exc.__class__.__name__})") from exc
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise StoreError(f"{path} is a Zarr store but not a ckpt-tools store")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise StoreError(
            f"{path} has store format {meta['format_version']}, newer than this ckpt-tools "
            f"reads ({FORMAT_VERSION}); upgrade ckpt-tools"
        )
    return root


def history_groups(path: str | Path) -> list[str]:
    """Paths of every recorded history group in the store, e.g. ``["train", "imp/level_1"]``."""
    root = read_root(path)
    found = []
    for name, group in root.groups():
        found.extend(_histories(name, group))
    return sorted(found)


def _histories(name: str, group: zarr.Group) -> list[str]:
    out = [name] if group.attrs.get(ATTRS_KEY, {}).get("kind") == "history" else []
    for child, sub in group.groups():
        out.extend(_histories(f"{name}/{child}", sub))
    return out


def _history_group(path: str | Path, group: str) -> zarr.Group:
    check_group_name(group)
    root = read_root(path)
    if group not in root:
        known = ", ".join(history_groups(path)) or "none"
        raise StoreError(f"{path} has no group '{group}' (recorded histories: {known})")
    node = root[group]
    if node.attrs.get(ATTRS_KEY, {}).get("kind") != "history":
        raise StoreError(f"group '{group}' in {path} is not a recorded history")
    return node


def _committed_only(ds: xr.Dataset) -> xr.Dataset:
    if "committed" not in ds or "step" not in ds.dims:
        return ds
    keep = np.flatnonzero(np.asarray(ds["committed"].values, dtype=bool))
    ds = ds.isel(step=keep)
    if "eval_step" in ds.dims:
        done = np.isfinite(np.asarray(ds[ds.attrs[ATTRS_KEY]["eval_metrics"][0]].values)) if (
            ds.attrs.get(ATTRS_KEY, {}).get("eval_metrics")
        ) else np.zeros(ds.sizes["eval_step"], dtype=bool)
        ds = ds.isel(eval_step=np.flatnonzero(done))
    return ds


def _open_kwargs() -> dict:
    return {"engine": "zarr", "chunks": {}, "consolidated": True}


def open_tree(path: str | Path) -> xr.DataTree:
    """Open a whole store lazily (dask) as an `xarray.DataTree`.

    Each history group shows only its committed steps.

    Raises:
        StoreError: if `path` is not a readable ckpt-tools store.
    """
    read_root(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tree = xr.open_datatree(os.fspath(path), **_open_kwargs())
    nodes = {node.path: _committed_only(node.to_dataset(inherit=False)) for node in tree.subtree}
    return xr.DataTree.from_dict(nodes)


def open_history(path: str | Path, group: str = "train") -> xr.Dataset:
    """Open one history group lazily as an `xarray.Dataset` of its committed steps.

    Raises:
        StoreError: if the store or the group is missing or not a history.
    """
    _history_group(path, group)
    ds = xr.open_zarr(os.fspath(path), group=group, chunks={}, consolidated=True)
    return _committed_only(ds)


def read_row(
    path: str | Path, step: int, *, group: str = "train"
) -> tuple[np.ndarray, np.ndarray, list[TensorSpec], list[TensorSpec]]:
    """Read the parameters and buffers stored for `step` (one row, no xarray).

    Returns:
        `(params_row, buffers_row, param_specs, buffer_specs)`.

    Raises:
        StoreError: if `step` is not a committed step of the group (the message lists the
            nearest stored steps).
    """
    node = _history_group(path, group)
    steps = np.asarray(node["step"][:])
    committed = np.asarray(node["committed"][:], dtype=bool)
    stored = steps[committed]
    hits = np.flatnonzero((steps == step) & committed)
    if not hits.size:
        nearest = stored[np.argsort(np.abs(stored - step), kind="stable")[:3]]
        near = ", ".join(str(s) for s in sorted(nearest)) or "none"
        raise StoreError(
            f"step {step} is not stored in '{group}' of {path}; nearest stored steps: {near}"
        )
    i = int(hits[0])
    meta = node.attrs[ATTRS_KEY]
    params = np.asarray(node["params"][i])
    buffers = np.asarray(node["buffers"][i])
    if np.isnan(params).any():
        raise StoreError(f"step {step} in '{group}' of {path} holds NaN weights: corrupt chunk?")
    return params, buffers, specs_from_json(meta["params"]), specs_from_json(meta["buffers"])


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_info(path: str | Path) -> dict:
    """Summary of a store: its histories with steps, layers, sizes and compression ratio."""
    root = read_root(path)
    path = Path(path)
    groups = []
    for name in history_groups(path):
        node = root[name]
        meta = node.attrs[ATTRS_KEY]
        steps = np.asarray(node["step"][:])[np.asarray(node["committed"][:], dtype=bool)]
        n_params = int(node["params"].shape[1])
        n_buffers = int(node["buffers"].shape[1])
        raw = int(len(steps)) * (n_params + n_buffers) * 4
        stored = _du(path / name / "params") + _du(path / name / "buffers")
        groups.append(
            {
                "group": name,
                "steps": len(steps),
                "first_step": int(steps[0]) if len(steps) else None,
                "last_step": int(steps[-1]) if len(steps) else None,
                "scheduled_steps": int(node["step"].shape[0]),
                "layers": len(meta["params"]),
                "prunable_layers": sum(1 for p in meta["params"] if p["prunable"]),
                "parameters": n_params,
                "buffer_elements": n_buffers,
                "raw_bytes": raw,
                "stored_bytes": stored,
                "ratio": stored / raw if raw else float("nan"),
                "config": meta.get("config", {}),
            }
        )
    return {
        "path": str(path),
        "format_version": root.attrs[ATTRS_KEY]["format_version"],
        "provenance": {k: v for k, v in root.attrs[ATTRS_KEY].items() if k != "format_version"},
        "size_on_disk": _du(path),
        "groups": groups,
    }
