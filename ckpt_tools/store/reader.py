"""Reading stores: validated, lazy xarray views and single rows for rewinding."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ckpt_tools.schedule import nearest
from ckpt_tools.store.chunks import ChunkReader, as_dask
from ckpt_tools.store.integrity import history_warnings
from ckpt_tools.store.layout import (
    ATTRS_KEY,
    CHUNK_STEPS,
    FORMAT_VERSION,
    StoreError,
    check_group_name,
    codec_of,
)
from ckpt_tools.store.location import Location, as_location, translate
from ckpt_tools.store.parts import PART_ARRAY
from ckpt_tools.store.resume import RESUME_ARRAYS
from ckpt_tools.store.safety import check_store
from ckpt_tools.store.walk import groups_of_kind
from ckpt_tools.tensors import TensorSpec, specs_from_json

__all__ = [
    "history_check",
    "history_groups",
    "history_meta",
    "open_chunks",
    "open_history",
    "open_tree",
    "read_row",
    "last_evaluations",
    "read_root",
    "store_info",
]


def read_root(path: str | Path | Location) -> zarr.Group:
    """Open the root group read-only after checking it is a ckpt-tools store.

    `path` is a local path, a URL or a `Location` (see `ckpt_tools.store.location`).

    Raises:
        StoreError: missing path, not a Zarr v3 store, not ours, a newer format, or
            metadata that is damaged or unsafe to decode (see `check_store`).
        LocationError: a URL whose bucket, credentials or endpoint do not work.
    """
    path = as_location(path)
    path.probe()
    if not path.is_file("zarr.json"):
        if not path.exists():
            raise StoreError(f"{path} does not exist; pass the path of a recorded store "
                             "(RUN.zarr)")
        raise StoreError(f"{path} is not a Zarr v3 store (no zarr.json); is it the right path?")
    check_store(path)
    try:
        with translate(path):
            root = zarr.open_group(path.open_target(read_only=True), mode="r", zarr_format=3)
        meta = root.attrs.get(ATTRS_KEY)
    except StoreError:
        raise
    except Exception as exc:  # corrupt or truncated metadata
        raise StoreError(f"{path}: unreadable store metadata ({exc.__class__.__name__})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
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
    try:
        found = groups_of_kind("", root, "history", below_matches=True)
    except Exception as exc:  # damaged metadata below the root
        raise StoreError(f"{path}: cannot list its groups ({exc.__class__.__name__}); the "
                         "store is damaged") from exc
    return [g for g in found if g]  # the root itself is never a history


def _history_group(path: str | Path, group: str, root: zarr.Group | None = None) -> zarr.Group:
    check_group_name(group)
    root = read_root(path) if root is None else root
    try:
        node = root.get(group, None)
    except Exception as exc:  # damaged metadata below the root
        raise StoreError(f"group '{group}' in {path}: unreadable metadata "
                         f"({exc.__class__.__name__})") from exc
    if node is None:
        known = ", ".join(history_groups(path)) or "none"
        raise StoreError(f"{path} has no group '{group}' (recorded histories: {known})")
    meta = node.attrs.get(ATTRS_KEY) if isinstance(node, zarr.Group) else None
    if not isinstance(meta, dict) or meta.get("kind") != "history":
        raise StoreError(f"group '{group}' in {path} is not a recorded history")
    for key in ("params", "buffers"):
        if not isinstance(meta.get(key), list):
            raise StoreError(f"group '{group}' in {path} has damaged attributes (no '{key}' "
                             "table)")
    return node


def history_check(path: str | Path, group: str = "train") -> list[str]:
    """What looks wrong with a history's rows, one line each (see `integrity`).

    Raises:
        StoreError: if the store or the group is missing or not a history.
    """
    return history_warnings(_history_group(path, group))


def open_chunks(path: str | Path, name: str = "params", *, group: str = "train") -> ChunkReader:
    """The `ChunkReader` of a history's ``params`` or ``buffers`` (all rows, committed or not).

    Raises:
        StoreError: missing store or group, or `name` is not one of its weight arrays.
    """
    if name not in _WEIGHTS:
        raise StoreError(f"{name!r} is not a weight array; use one of {', '.join(_WEIGHTS)}")
    return ChunkReader(_history_group(path, group)[name])


def history_meta(path: str | Path, group: str = "train") -> dict:
    """The ``ckpt_tools`` attributes of one history group (config, tables, schedule).

    Raises:
        StoreError: if the store or the group is missing or not a history.
    """
    return dict(_history_group(path, group).attrs[ATTRS_KEY])


_WEIGHTS = ("params", "buffers")  # the (step, x) arrays read with `ChunkReader`


def _fast_reads(ds: xr.Dataset, node: zarr.Group) -> xr.Dataset:
    """`ds` with its weight arrays read chunk by chunk at decode speed (`as_dask`)."""
    swapped = {name: ds[name].copy(data=as_dask(node[name])) for name in _WEIGHTS
               if name in ds and ds[name].ndim == 2 and name in node}
    return ds.assign(swapped) if swapped else ds


def _committed_only(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.drop_vars([n for n in (*RESUME_ARRAYS, PART_ARRAY) if n in ds.variables])
    if "committed" not in ds or "step" not in ds.dims:
        return ds
    keep = np.flatnonzero(np.asarray(ds["committed"].values, dtype=bool))
    if keep.size and keep[-1] - keep[0] + 1 == keep.size:  # a run of rows: keep chunks whole
        keep = slice(int(keep[0]), int(keep[-1]) + 1)
    ds = ds.isel(step=keep)
    if "eval_step" in ds.dims:
        done = np.isfinite(np.asarray(ds[ds.attrs[ATTRS_KEY]["eval_metrics"][0]].values)) if (
            ds.attrs.get(ATTRS_KEY, {}).get("eval_metrics")
        ) else np.zeros(ds.sizes["eval_step"], dtype=bool)
        ds = ds.isel(eval_step=np.flatnonzero(done))
    return ds


def _open_kwargs() -> dict:
    return {"engine": "zarr", "chunks": {}, "consolidated": True}


def open_tree(path: str | Path | Location) -> xr.DataTree:
    """Open a whole store lazily (dask) as an `xarray.DataTree`.

    Each history group shows only its committed steps.

    Raises:
        StoreError: if `path` is not a readable ckpt-tools store.
    """
    path = as_location(path)
    root = read_root(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            tree = xr.open_datatree(path.open_target(read_only=True), **_open_kwargs())
        nodes = {}
        for node in tree.subtree:
            ds = node.to_dataset(inherit=False)
            if isinstance(ds.attrs.get(ATTRS_KEY), dict) and (
                    ds.attrs[ATTRS_KEY].get("kind") == "history"):
                ds = _fast_reads(ds, root[node.path.strip("/")])
            nodes[node.path] = _committed_only(ds)
        return xr.DataTree.from_dict(nodes)
    except StoreError:
        raise
    except Exception as exc:  # damaged metadata or chunks of the step/committed arrays
        raise StoreError(f"{path}: cannot open the store ({exc.__class__.__name__}: "
                         f"{_first_line(exc)}); the store is damaged") from exc


def open_history(path: str | Path | Location, group: str = "train") -> xr.Dataset:
    """Open one history group lazily as an `xarray.Dataset` of its committed steps.

    Raises:
        StoreError: if the store or the group is missing or not a history.
    """
    path = as_location(path)
    node = _history_group(path, group)
    try:
        ds = xr.open_zarr(path.open_target(read_only=True), group=group, chunks={},
                          consolidated=True)
        return _committed_only(_fast_reads(ds, node))
    except Exception as exc:  # damaged metadata or chunks of the step/committed arrays
        raise StoreError(f"group '{group}' in {path}: cannot open ({exc.__class__.__name__}: "
                         f"{_first_line(exc)}); the store is damaged") from exc


def last_evaluations(path: str | Path, groups: Iterable[str]) -> dict[str, dict[str, float]]:
    """The last completed evaluation of each of `groups`, by group (``{}`` for none).

    E.g. ``{"imp/rewind_0/seed_0/level_1": {"test_accuracy": 0.91, "test_loss": 0.27}}``.

    Checks and opens the store once for all `groups` and reads only their evaluation
    arrays, so gathering the results of many runs costs one metadata pass, not one each.

    Raises:
        StoreError: a group is missing or not a history, or its evaluations do not decode.
    """
    root = read_root(path)
    out: dict[str, dict[str, float]] = {}
    for group in groups:
        node = _history_group(path, group, root)
        names = node.attrs[ATTRS_KEY].get("eval_metrics") or []
        where = f"group '{group}' in {path}"
        values = {n: _read(node, n, slice(None), where, "*") for n in names}
        done = np.flatnonzero(np.isfinite(values[names[0]])) if names else np.array([], int)
        out[group] = {n: float(values[n][done[-1]]) for n in names} if done.size else {}
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no details"


def _read(node: zarr.Group, name: str, index: int, where: str, chunk: str) -> np.ndarray:
    try:
        return np.asarray(node[name][index])
    except Exception as exc:  # a chunk that does not decode
        raise StoreError(f"{where}: cannot read '{name}' (chunk {name}/c/{chunk}: "
                         f"{exc.__class__.__name__}); the store is damaged") from exc


def _read_row(node: zarr.Group, name: str, row: int, where: str) -> np.ndarray:
    """Row `row` of a `(step, x)` array, decoding each chunk of its row of chunks once."""
    try:
        reader = ChunkReader(node[name])
        k = reader.chunks[0]
        parts = [reader.read(row // k, j)[row % k] for j in range(reader.grid()[1])]
        return np.concatenate(parts) if parts else np.zeros(0, reader.dtype)
    except Exception as exc:  # a chunk that does not decode
        raise StoreError(f"{where}: cannot read '{name}' (chunk {name}/c/{row // CHUNK_STEPS}"
                         f"/*: {exc.__class__.__name__}); the store is damaged") from exc


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
    where = f"group '{group}' in {path}"
    steps = _read(node, "step", slice(None), where, "0")
    committed = _read(node, "committed", slice(None), where, "0").astype(bool)
    if steps.shape != committed.shape:
        raise StoreError(f"{where}: 'step' and 'committed' disagree in length; damaged")
    stored = steps[committed]
    hits = np.flatnonzero((steps == step) & committed)
    if not hits.size:
        near = ", ".join(str(s) for s in nearest(stored, step)) or "none"
        raise StoreError(
            f"step {step} is not stored in '{group}' of {path}; nearest stored steps: {near}"
        )
    i = int(hits[0])
    meta = node.attrs[ATTRS_KEY]
    at = f"{where}, step {step}"
    params = _read_row(node, "params", i, at)
    buffers = _read_row(node, "buffers", i, at)
    if np.isnan(params).any():
        raise StoreError(f"step {step} in '{group}' of {path} holds NaN weights: corrupt chunk?")
    try:
        p_specs, b_specs = specs_from_json(meta["params"]), specs_from_json(meta["buffers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{where}: damaged tensor tables ({exc.__class__.__name__})") from exc
    for specs, row, name in ((p_specs, params, "params"), (b_specs, buffers, "buffers")):
        if (specs[-1].stop if specs else 0) != row.shape[-1]:
            raise StoreError(f"{where}: the '{name}' table does not match the array width; "
                             "damaged")
    return params, buffers, p_specs, b_specs


_HISTORY_ARRAYS = ("step", "committed", "params", "buffers", "grad_norm")


def committed_count(path: str | Path, group: str) -> tuple[bool, int]:
    """Whether a history group's arrays all exist, and how many of its rows are committed.

    Reads only the group's own metadata and `committed` flags (no consolidated metadata),
    so it works on a group whose creation was interrupted: `(False, 0)`.

    Raises:
        StoreError: the `committed` flags exist but cannot be read.
    """
    folder = as_location(path).child(group)
    if not all(folder.is_file(f"{name}/zarr.json") for name in _HISTORY_ARRAYS):
        return False, 0
    try:
        node = zarr.open_group(folder.open_target(read_only=True), mode="r",
                               use_consolidated=False)
        flags = np.asarray(node["committed"][:], dtype=bool)
    except Exception as exc:  # a damaged chunk of the committed flags
        raise StoreError(f"group '{group}' in {path}: unreadable 'committed' flags "
                         f"({exc.__class__.__name__}); the store is damaged") from exc
    return True, int(flags.sum())


def _group_info(path: Location, name: str) -> dict:
    node = _history_group(path, name)
    meta = node.attrs[ATTRS_KEY]
    where = f"group '{name}' in {path}"
    flags = _read(node, "committed", slice(None), where, "0").astype(bool)
    steps = _read(node, "step", slice(None), where, "0")[flags]
    n_params = int(node["params"].shape[1])
    n_buffers = int(node["buffers"].shape[1])
    raw = int(len(steps)) * (n_params + n_buffers) * 4
    stored = path.size(f"{name}/params") + path.size(f"{name}/buffers")
    return {
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
        "codec": codec_of(node["params"].metadata.to_dict().get("codecs", [])),
        "config": meta.get("config", {}),
        "warnings": history_warnings(node),
    }


def store_info(path: str | Path) -> dict:
    """Summary of a store: its histories with steps, layers, sizes and compression ratio."""
    path = as_location(path)
    root = read_root(path)
    groups = []
    for name in history_groups(path):
        try:
            groups.append(_group_info(path, name))
        except StoreError:
            raise
        except Exception as exc:  # attributes or arrays that are not what we wrote
            raise StoreError(f"group '{name}' in {path}: damaged metadata "
                             f"({exc.__class__.__name__}: {_first_line(exc)})") from exc
    return {
        "path": str(path),
        "format_version": root.attrs[ATTRS_KEY]["format_version"],
        "provenance": {k: v for k, v in root.attrs[ATTRS_KEY].items() if k != "format_version"},
        "size_on_disk": path.size(),
        "groups": groups,
    }
