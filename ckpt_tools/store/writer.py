"""Writing one recorded history: create the group, write rows, commit them.

The schedule is known in advance, so every array is created at full length once (floats
filled with NaN, never 0.0: a phantom row of zeros would read as real weights) and rows
are written in place, whole chunks of `CHUNK_STEPS` checkpoints at a time. A row becomes
visible only when its `committed` flag is set, which happens after all of its arrays
are written; every chunk and metadata file is replaced atomically (write, then rename).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr

from ckpt_tools.store.layout import (
    ATTRS_KEY,
    CHUNK_STEPS,
    FORMAT_VERSION,
    PARAM_CHUNK,
    StoreError,
    check_group_name,
    lossless_compressor,
    time_major,
    to_json_safe,
)
from ckpt_tools.tensors import TensorSpec, specs_from_json, specs_to_json

__all__ = ["HistoryWriter", "consolidate", "open_root_for_writing"]

_SCALAR_CHUNK = 4096


def consolidate(path: str | Path) -> None:
    """Rewrite the consolidated metadata that lets xarray open the store in one read."""
    with warnings.catch_warnings():
        # Consolidated metadata is an extension of Zarr v3 that other readers ignore.
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def open_root_for_writing(path: str | Path, root_attrs: Mapping) -> zarr.Group:
    """Open (or create) the store at `path` for writing, checking it is one of ours.

    Raises:
        StoreError: if `path` exists but is not a ckpt-tools store, or its parent is missing.
    """
    path = Path(path)
    if path.exists():
        if not (path / "zarr.json").is_file():
            if path.is_dir() and not any(path.iterdir()):
                pass
            else:
                raise StoreError(
                    f"{path} exists and is not a ckpt-tools store; choose a new --out path"
                )
        else:
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
            meta = root.attrs.get(ATTRS_KEY)
            if not isinstance(meta, dict) or "format_version" not in meta:
                raise StoreError(f"{path} is a Zarr store but not a ckpt-tools store")
            return root
    if not path.parent.exists():
        raise StoreError(f"directory {path.parent} does not exist; create it first")
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    root.attrs[ATTRS_KEY] = to_json_safe({"format_version": FORMAT_VERSION, **root_attrs})
    return root


def _float_array(group, name, shape, chunks, dims, *, compress=True):
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype="float32" if compress else "float64",
        fill_value=np.nan,
        dimension_names=dims,
        filters=[time_major()] if compress and len(shape) == 2 else None,
        compressors=[lossless_compressor()] if compress else "auto",
    )


class HistoryWriter:
    """Writes rows of one history group (see ``docs/store-format.md``).

    Not thread-safe: one `Recorder` writer thread owns it.
    """

    def __init__(self, root_path: Path, group: zarr.Group):
        self.root_path = Path(root_path)
        self.group = group
        meta = group.attrs[ATTRS_KEY]
        self.params: list[TensorSpec] = specs_from_json(meta["params"])
        self.buffers: list[TensorSpec] = specs_from_json(meta["buffers"])
        self.steps = np.asarray(group["step"][:])
        self.n_params = sum(s.size for s in self.params)
        self._committed = group["committed"]
        self._scalars = {
            n: group[n] for n in meta.get("scalars", []) if n in group.array_keys()
        }

    @classmethod
    def create(
        cls,
        path: str | Path,
        name: str,
        *,
        steps: Sequence[int],
        params: Sequence[TensorSpec],
        buffers: Sequence[TensorSpec],
        attrs: Mapping,
        root_attrs: Mapping,
        eval_steps: Sequence[int] = (),
        overwrite: bool = False,
    ) -> HistoryWriter:
        """Create the group `name` with every array at full length.

        Raises:
            StoreError: if the group exists and `overwrite` is false.
        """
        check_group_name(name)
        root = open_root_for_writing(path, root_attrs)
        if name in root:
            if not overwrite:
                raise StoreError(
                    f"group '{name}' already exists in {path}; pass --overwrite to replace it "
                    "or --resume to continue it"
                )
            shutil.rmtree(Path(path) / name)
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
        group = root.create_group(name)
        n_steps, n_layers = len(steps), len(params)
        n_params = sum(s.size for s in params)
        n_buffers = max(sum(s.size for s in buffers), 0)
        step = group.create_array(
            "step", shape=(n_steps,), chunks=(n_steps,), dtype="int64", fill_value=-1,
            dimension_names=("step",),
        )
        step[:] = np.asarray(steps, dtype=np.int64)
        group.create_array(
            "committed", shape=(n_steps,), chunks=(n_steps,), dtype="bool", fill_value=False,
            dimension_names=("step",),
        )
        p_chunk = min(max(n_params, 1), PARAM_CHUNK)
        _float_array(
            group, "params", (n_steps, n_params), (CHUNK_STEPS, p_chunk), ("step", "param")
        )
        b_chunk = min(max(n_buffers, 1), PARAM_CHUNK)
        _float_array(
            group, "buffers", (n_steps, n_buffers), (CHUNK_STEPS, b_chunk), ("step", "buffer")
        )
        _float_array(
            group, "grad_norm", (n_steps, n_layers), (256, max(n_layers, 1)), ("step", "layer")
        )
        cls._write_table(group, "layer", params)
        cls._write_table(group, "buffer_layer", buffers)
        if eval_steps:
            ev = group.create_array(
                "eval_step", shape=(len(eval_steps),), chunks=(len(eval_steps),),
                dtype="int64", fill_value=-1, dimension_names=("eval_step",),
            )
            ev[:] = np.asarray(eval_steps, dtype=np.int64)
        group.attrs[ATTRS_KEY] = to_json_safe(
            {
                **attrs,
                "kind": "history",
                "params": specs_to_json(params),
                "buffers": specs_to_json(buffers),
                "scalars": [],
                "eval_metrics": [],
            }
        )
        consolidate(path)
        return cls(Path(path), group)

    @staticmethod
    def _write_table(group: zarr.Group, dim: str, specs: Sequence[TensorSpec]) -> None:
        n = len(specs)
        names = group.create_array(
            dim, shape=(n,), chunks=(max(n, 1),), dtype=str, dimension_names=(dim,)
        )
        columns = {
            "offset": ("int64", [s.offset for s in specs]),
            "size": ("int64", [s.size for s in specs]),
            "prunable": ("bool", [s.prunable for s in specs]),
        }
        if n:
            names[:] = np.array([s.name for s in specs])
        for column, (dtype, values) in columns.items():
            arr = group.create_array(
                f"{dim}_{column}", shape=(n,), chunks=(max(n, 1),), dtype=dtype,
                fill_value=0, dimension_names=(dim,),
            )
            if n:
                arr[:] = np.asarray(values, dtype=dtype)

    @classmethod
    def reopen(cls, path: str | Path, name: str) -> HistoryWriter:
        """Open an existing history group to continue writing it (resume).

        Raises:
            StoreError: if the store or group is missing or not a history.
        """
        check_group_name(name)
        root = open_root_for_writing(path, {})
        if name not in root:
            raise StoreError(f"{path} has no group '{name}' to resume")
        group = root[name]
        if group.attrs.get(ATTRS_KEY, {}).get("kind") != "history":
            raise StoreError(f"group '{name}' in {path} is not a recorded history")
        return cls(Path(path), group)

    def update_attrs(self, **values) -> None:
        """Merge `values` into the group's ckpt_tools attributes and re-consolidate."""
        meta = dict(self.group.attrs[ATTRS_KEY])
        meta.update(to_json_safe(values))
        self.group.attrs[ATTRS_KEY] = meta
        consolidate(self.root_path)

    def committed_mask(self) -> np.ndarray:
        """Boolean `(step,)` array: which rows are complete."""
        return np.asarray(self._committed[:], dtype=bool)

    def _scalar(self, name: str):
        if name not in self._scalars:
            n = len(self.steps)
            self._scalars[name] = _float_array(
                self.group, name, (n,), (min(n, _SCALAR_CHUNK),), ("step",), compress=False
            )
            meta = self.group.attrs[ATTRS_KEY]
            self.update_attrs(scalars=[*meta.get("scalars", []), name])
        return self._scalars[name]

    def write_rows(
        self,
        start: int,
        params: np.ndarray,
        buffers: np.ndarray,
        grad_norm: np.ndarray | None = None,
        scalars: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write rows `start:start+len(params)` of every per-step array (not yet visible)."""
        stop = start + len(params)
        self.group["params"][start:stop] = params
        if buffers.shape[1]:
            self.group["buffers"][start:stop] = buffers
        if grad_norm is not None:
            self.group["grad_norm"][start:stop] = grad_norm
        for name, values in (scalars or {}).items():
            self._scalar(name)[start:stop] = values

    def commit(self, rows: np.ndarray) -> None:
        """Mark `rows` (indices along `step`) complete; call only after `write_rows`."""
        rows = np.asarray(rows)
        if rows.size == 0:
            return
        lo, hi = int(rows.min()), int(rows.max()) + 1
        flags = np.asarray(self._committed[lo:hi], dtype=bool)
        flags[rows - lo] = True
        self._committed[lo:hi] = flags

    def write_eval(self, index: int, metrics: Mapping[str, float]) -> None:
        """Write evaluation metrics at position `index` of `eval_step`."""
        group = self.group
        if "eval_step" not in group:
            raise StoreError("this history was created without an evaluation schedule")
        new = [m for m in metrics if m not in group]
        for name in new:
            n = group["eval_step"].shape[0]
            group.create_array(
                name, shape=(n,), chunks=(n,), dtype="float64", fill_value=np.nan,
                dimension_names=("eval_step",),
            )
        if new:
            meta = group.attrs[ATTRS_KEY]
            self.update_attrs(eval_metrics=[*meta.get("eval_metrics", []), *new])
        for name, value in metrics.items():
            group[name][index] = float(value)

    def write_array(self, name: str, values: np.ndarray, dims: tuple[str, ...]) -> None:
        """Write (or replace) a small auxiliary array in this group, e.g. resume state."""
        if name in self.group:
            del self.group[name]
        arr = self.group.create_array(
            name, shape=values.shape, chunks=values.shape or None, dtype=values.dtype,
            fill_value=0, dimension_names=dims,
        )
        arr[...] = values

    def close(self) -> None:
        """Re-consolidate metadata so readers see everything written."""
        consolidate(self.root_path)
