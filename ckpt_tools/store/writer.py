"""Writing one recorded history: create the group, write rows, commit them.

The schedule is known in advance, so every array is created at full length once (floats
filled with NaN, never 0.0: a phantom row of zeros would read as real weights) and rows
are written in place, whole chunks of `chunk_steps` checkpoints at a time. A row becomes
visible only when its `committed` flag is set, which happens after all of its arrays
are written; every chunk and metadata file is replaced atomically (write, then rename).

One writer at a time: a `HistoryWriter` holds its group's `GroupLock` from creation or
reopening until `close`/`release`. Writers read metadata from each node's own
``zarr.json`` (never the consolidated copy, which a crash can leave stale) and remove the
``*.partial`` files that a killed writer leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr

from ckpt_tools.store.history_extras import create_optimizer_arrays, ensure_batch_array
from ckpt_tools.store.integrity import ensure_hash_array, row_digests
from ckpt_tools.store.layout import (
    ATTRS_KEY,
    CHUNK_STEPS,
    FORMAT_VERSION,
    SHARD_BYTES,
    Codec,
    StoreError,
    check_codec,
    check_group_name,
    check_name,
    lossless_compressor,
    row_array_layout,
    time_major,
    to_json_safe,
)
from ckpt_tools.store.location import Location, as_location, translate
from ckpt_tools.store.lock import LOCK_NAME, GroupLock, lock_for
from ckpt_tools.store.parts import mark_parts, ready_rows, start_session
from ckpt_tools.store.resume import ResumePoint, clear_resume_point, write_resume_point
from ckpt_tools.store.safety import check_store
from ckpt_tools.tensors import TensorSpec, specs_from_json, specs_to_json

__all__ = ["HistoryWriter", "consolidate", "open_root_for_writing"]

_SCALAR_CHUNK = 4096
_STALE_PARTIAL_S = 60.0  # a metadata write takes milliseconds; older temp files are orphans


def consolidate(path: str | Path | Location) -> None:
    """Rewrite the consolidated metadata that lets xarray open the store in one read.

    Writers of different groups of one store take turns (a lock on the store directory;
    in object storage a short-lived lock object), so none overwrites the root metadata
    with a listing read before another's change.
    """
    loc = as_location(path)
    if not loc.is_local:
        from ckpt_tools.store.lease import LeaseLock

        turn = LeaseLock(loc, f"the metadata of {loc}", lease_s=60.0, renew=False,
                         name=".consolidate.lock")
        turn.acquire(wait_s=120.0)
        try:
            with warnings.catch_warnings(), translate(loc):
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(loc.zarr_store(read_only=False))
        finally:
            turn.release()
        return
    path = loc.path
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # file systems without flock: best effort
            fcntl.flock(fd, fcntl.LOCK_EX)
        with warnings.catch_warnings():
            # Consolidated metadata is an extension of Zarr v3 that other readers ignore;
            # lock and temporary files are not part of the hierarchy.
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(path))
    finally:
        os.close(fd)


def remove_partials(directory: Path, *, min_age_s: float = 0.0) -> int:
    """Delete the ``*.partial`` temporary files a killed Zarr write left in `directory`.

    Call it only under the lock of the group that owns `directory` (or with `min_age_s`
    large enough that no live write can own the file). Returns how many were removed.
    """
    removed, now = 0, time.time()
    for tmp in Path(directory).rglob("*.partial"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_file() and now - tmp.stat().st_mtime >= min_age_s:
                tmp.unlink()
                removed += 1
    return removed


def _only_leftovers(directory: Location) -> bool:
    if directory.is_local and not directory.path.is_dir():
        return False
    return all(name.endswith(LOCK_NAME) or name.endswith(".partial")
               for name, _ in directory.listdir())


def open_root_for_writing(path: str | Path | Location, root_attrs: Mapping) -> zarr.Group:
    """Open (or create) the store at `path` for writing, checking it is one of ours.

    Raises:
        StoreError: if `path` exists but is not a ckpt-tools store, or its parent is missing.
        LocationError: a read-only URL, or a bucket, credentials or endpoint that fail.
    """
    path = as_location(path)
    path.require_writable()
    path.probe()
    if path.exists():
        if not path.is_file("zarr.json"):
            if not _only_leftovers(path):
                raise StoreError(
                    f"{path} exists and is not a ckpt-tools store; choose a new --out path"
                )
        else:
            attrs = check_store(path).get("attributes")
            meta = attrs.get(ATTRS_KEY) if isinstance(attrs, dict) else None
            if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
                raise StoreError(f"{path} is a Zarr store but not a ckpt-tools store")
            if int(meta["format_version"]) > FORMAT_VERSION:
                raise StoreError(f"{path} has store format {meta['format_version']}, newer "
                                 f"than this ckpt-tools writes ({FORMAT_VERSION}); upgrade it")
            if path.is_local:
                remove_partials(path.path, min_age_s=_STALE_PARTIAL_S)
            with translate(path):
                return zarr.open_group(path.open_target(read_only=False), mode="r+",
                                       zarr_format=3, use_consolidated=False)
    if path.is_local and not path.path.parent.is_dir():
        raise StoreError(f"directory {path.path.parent} does not exist; create it first")
    # The root's attributes go into its first metadata write: a crash never leaves a root
    # that does not say it is a ckpt-tools store.
    attrs = to_json_safe({"format_version": FORMAT_VERSION, **root_attrs})
    try:
        with translate(path):
            return zarr.open_group(path.open_target(read_only=False), mode="w-", zarr_format=3,
                                   attributes={ATTRS_KEY: attrs})
    except (FileExistsError, zarr.errors.ContainsGroupError):
        raise StoreError(f"{path} was created by another process just now; try again") from None


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

    Not thread-safe: one `Recorder` writer thread owns it. It holds the group's lock
    (`lock`) until `close` or `release`.

    Raises:
        StoreError: the group's layout is incomplete (its creation was interrupted).
    """

    def __init__(self, root_path: str | Path | Location, group: zarr.Group,
                 lock: GroupLock | None = None):
        self.root_path = as_location(root_path)
        self.group = group
        self.lock = lock
        meta = group.attrs[ATTRS_KEY]
        missing = [n for n in ("step", "committed", "params", "buffers", "grad_norm")
                   if n not in group]
        if missing:
            raise StoreError(
                f"group '{group.path}' in {root_path} is incomplete (no '{missing[0]}': its "
                "creation was interrupted); record it again with --overwrite"
            )
        self.params: list[TensorSpec] = specs_from_json(meta["params"])
        self.buffers: list[TensorSpec] = specs_from_json(meta["buffers"])
        self.steps = np.asarray(group["step"][:])
        self.n_params = sum(s.size for s in self.params)
        self._committed = group["committed"]
        self._hash_array = None
        self._scalars = {
            n: group[n] for n in meta.get("scalars", []) if check_name(n) and n in group
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
        codec: str = Codec.lz4,
        chunk_steps: int = CHUNK_STEPS,
        shard_bytes: int = SHARD_BYTES,
        optimizer_state: Sequence[str] = (),
    ) -> HistoryWriter:
        """Create the group `name` with every array at full length.

        Args:
            path: The store; created when missing.
            name: The group's path inside the store.
            steps: The whole schedule (one row per step).
            params: Table of the parameter tensors (the `param` axis).
            buffers: Table of the buffer tensors (the `buffer` axis).
            attrs: The group's ckpt_tools attributes (configuration, schedule, ...).
            root_attrs: Provenance for the root, used when the store is new.
            eval_steps: The evaluation schedule, if any.
            overwrite: Replace an existing group of that name.
            codec: ``"lz4"`` (default) or ``"none"`` for `params` and `buffers` (see
                `Codec`; ``ckpt compact`` compresses ``none`` later).
            chunk_steps: Checkpoints per chunk along `step` (rows the caller writes at once).
            shard_bytes: Raw bytes of one shard at most (big models; see
                `row_array_layout`).
            optimizer_state: Optimizer state entries to store as ``optim_<entry>``
                arrays (see `ckpt_tools.store.history_extras`).

        Raises:
            StoreError: if the group exists and `overwrite` is false, or `codec` is unknown.
        """
        check_group_name(name)
        codec = check_codec(codec)
        if not isinstance(chunk_steps, int) or chunk_steps < 1:
            raise StoreError(f"chunk_steps must be a positive integer, not {chunk_steps!r}")
        path = as_location(path)
        root = open_root_for_writing(path, root_attrs)
        # A store keeps the layout of the format it was created with, so readers of that
        # format still read every group of it.
        layout = {"codec": codec, "chunk_steps": chunk_steps, "shard_bytes": shard_bytes,
                  "format_version": int(root.attrs[ATTRS_KEY]["format_version"])}
        exists_msg = (f"group '{name}' already exists in {path}; pass --overwrite to replace "
                      "it or --resume to continue it")
        if name in root and not overwrite:
            raise StoreError(exists_msg)
        lock = lock_for(path.child(name), f"group '{name}' in {path}").acquire()
        try:
            group = cls._fresh_group(root, path, name, overwrite=overwrite,
                                     exists_msg=exists_msg, attrs={
                **attrs,
                "kind": "history",
                "params": specs_to_json(params),
                "buffers": specs_to_json(buffers),
                "scalars": [],
                "eval_metrics": [],
                "optimizer_state": list(optimizer_state),
            })
            cls._create_arrays(group, steps, params, buffers, eval_steps, layout)
            create_optimizer_arrays(group, optimizer_state, len(steps),
                                    sum(s.size for s in params), layout)
            consolidate(path)
            return cls(path, group, lock)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _fresh_group(
        root: zarr.Group, path: Location, name: str, *, overwrite: bool, exists_msg: str,
        attrs: Mapping,
    ) -> zarr.Group:
        # Under the group's lock: replace or create the group, its attributes first, so a
        # crash right after leaves a group that says what it was meant to hold.
        folder = path.child(name)
        if folder.is_local and folder.path.is_symlink():
            raise StoreError(f"{folder} is a symbolic link; refusing to write through it")
        if name in root:
            if not overwrite:
                raise StoreError(exists_msg)
            if folder.is_local:
                for entry in folder.path.iterdir():
                    if entry.name == LOCK_NAME:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            else:
                for entry, _ in folder.listdir():
                    if entry != LOCK_NAME:
                        folder.remove(entry, recursive=True)
        elif folder.exists() and not _only_leftovers(folder):
            raise StoreError(f"{folder} exists and is not a Zarr group; move it away first")
        if folder.is_local:
            remove_partials(folder.path)
        return root.create_group(name, attributes={ATTRS_KEY: to_json_safe(attrs)})

    @classmethod
    def _create_arrays(
        cls,
        group: zarr.Group,
        steps: Sequence[int],
        params: Sequence[TensorSpec],
        buffers: Sequence[TensorSpec],
        eval_steps: Sequence[int],
        layout: Mapping,
    ) -> None:
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
        for name, width, dim in (("params", n_params, "param"), ("buffers", n_buffers, "buffer")):
            group.create_array(
                name, shape=(n_steps, width), dtype="float32", fill_value=np.nan,
                dimension_names=("step", dim), **row_array_layout(width, **layout),
            )
        _float_array(
            group, "grad_norm", (n_steps, n_layers), (256, max(n_layers, 1)), ("step", "layer")
        )
        ensure_hash_array(group)
        cls._write_table(group, "layer", params)
        cls._write_table(group, "buffer_layer", buffers)
        if eval_steps:
            ev = group.create_array(
                "eval_step", shape=(len(eval_steps),), chunks=(len(eval_steps),),
                dtype="int64", fill_value=-1, dimension_names=("eval_step",),
            )
            ev[:] = np.asarray(eval_steps, dtype=np.int64)

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
            StoreError: if the store or group is missing or not a history, or another
                writer holds the group.
        """
        check_group_name(name)
        path = as_location(path)
        root = open_root_for_writing(path, {})
        if name not in root:
            raise StoreError(f"{path} has no group '{name}' to resume")
        folder = path.child(name)
        if folder.is_local and folder.path.is_symlink():
            raise StoreError(f"{folder} is a symbolic link; refusing to write through it")
        lock = lock_for(folder, f"group '{name}' in {path}").acquire()
        try:
            group = root[name]
            if group.attrs.get(ATTRS_KEY, {}).get("kind") != "history":
                raise StoreError(f"group '{name}' in {path} is not a recorded history")
            if folder.is_local:
                remove_partials(folder.path)
            return cls(path, group, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def attach(cls, path: str | Path, name: str) -> HistoryWriter:
        """Open a group that another rank of the same job holds the lock of.

        For the ranks other than 0 of a sharded recording: rank 0 creates or reopens the
        group (and holds its lock) first; the others then write their own chunks and
        their own `part_written` flags through this writer, and nothing else.

        Raises:
            StoreError: if the group is missing or not a history.
        """
        check_group_name(name)
        path = as_location(path)
        try:
            with translate(path):
                group = zarr.open_group(path.child(name).open_target(read_only=False), mode="r+",
                                        zarr_format=3, use_consolidated=False)
        except FileNotFoundError:
            raise StoreError(f"{path} has no group '{name}'") from None
        if group.attrs.get(ATTRS_KEY, {}).get("kind") != "history":
            raise StoreError(f"group '{name}' in {path} is not a recorded history")
        return cls(path, group, None)

    def start_session(self, world: int) -> int:
        """Prepare per-rank flags for `world` ranks and return a new session number.

        The group's attributes then say ``ranks: world``: its rows have no single
        writer, so they carry no content hash (`row_hash` stays zero).
        """
        session = start_session(self.group, world)
        self.update_attrs(ranks=int(world))
        return session

    def mark_parts(self, rows: np.ndarray, rank: int, session: int) -> None:
        """Flag `rows` as written by `rank` in `session` (call after its `write_rows`)."""
        mark_parts(self.group, rows, rank, session)

    def commit_ready(self, session: int) -> np.ndarray:
        """Commit every row that all ranks have written in `session`; return those rows."""
        rows = ready_rows(self.group, session)
        self.commit(rows)
        return rows

    def update_attrs(self, **values) -> None:
        """Merge `values` into the group's ckpt_tools attributes and re-consolidate."""
        meta = dict(self.group.attrs[ATTRS_KEY])
        meta.update(to_json_safe(values))
        self.group.attrs[ATTRS_KEY] = meta
        consolidate(self.root_path)

    def file_shape(self, name: str = "params") -> tuple[int, int]:
        """`(rows, columns)` that one stored file of the row array `name` covers.

        A chunk, or a shard when the array is sharded. Processes that share the writing of
        a block of rows must split it at multiples of these columns: two writers of parts
        of one file would each rewrite the whole file, and one of them would lose.
        """
        return tuple(int(n) for n in self.group[name].metadata.chunk_grid.chunk_shape)

    def ensure_batch(self, width: int) -> None:
        """Create the `batch` array, `width` example ids wide, if it does not exist."""
        if "batch" not in self.group:
            ensure_batch_array(self.group, width)
            consolidate(self.root_path)

    def committed_mask(self) -> np.ndarray:
        """Boolean `(step,)` array: which rows are complete."""
        return np.asarray(self._committed[:], dtype=bool)

    def _scalar(self, name: str):
        if name not in self._scalars:
            check_name(name)
            n = len(self.steps)
            if name in self.group:  # made just before a crash, not yet listed
                self._scalars[name] = self.group[name]
            else:
                self._scalars[name] = _float_array(
                    self.group, name, (n,), (min(n, _SCALAR_CHUNK),), ("step",),
                    compress=False,
                )
            meta = self.group.attrs[ATTRS_KEY]
            if name not in meta.get("scalars", []):
                self.update_attrs(scalars=[*meta.get("scalars", []), name])
        return self._scalars[name]

    def write_rows(
        self,
        start: int,
        params: np.ndarray,
        buffers: np.ndarray,
        grad_norm: np.ndarray | None = None,
        scalars: Mapping[str, np.ndarray] | None = None,
        *,
        columns: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """Write rows `start:start+len(params)` of every per-step array (not yet visible).

        `columns` and `buffers=None` as in `write_rows_async`.
        """
        writes = self._row_writes(start, params, buffers, grad_norm, scalars, columns)
        for array, rows, values in writes:
            array[rows] = values

    async def write_rows_async(
        self,
        start: int,
        params: np.ndarray,
        buffers: np.ndarray,
        grad_norm: np.ndarray | None = None,
        scalars: Mapping[str, np.ndarray] | None = None,
        *,
        columns: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """`write_rows` on the caller's event loop, whose executor then runs the codecs.

        The `Recorder` uses this to compress on its own low-priority threads. With
        `columns` (chunk-aligned `(start, stop)` runs of `param`), `params` holds only
        those runs, concatenated, and only they are written; `buffers=None` writes none.
        """
        if not self.root_path.is_local:
            # An object store's client session lives on zarr's own event loop: write
            # through it, from the caller's executor.
            await asyncio.get_running_loop().run_in_executor(None, functools.partial(
                self.write_rows, start, params, buffers, grad_norm, scalars, columns=columns))
            return
        writes = self._row_writes(start, params, buffers, grad_norm, scalars, columns)
        await asyncio.gather(*(a.async_array.setitem(rows, v) for a, rows, v in writes))

    def _row_writes(self, start, params, buffers, grad_norm, scalars, columns=None):
        rows = slice(start, start + len(params))
        if columns is None:
            writes = [(self.group["params"], rows, params),
                      (self._hashes(), rows, row_digests(params, buffers))]
        else:  # no process holds the whole row: such rows carry no content hash
            writes, at = [], 0
            for lo, hi in columns:
                part = params[:, at : at + hi - lo]
                writes.append((self.group["params"], (rows, slice(lo, hi)), part))
                at += hi - lo
        if buffers is not None and buffers.shape[1]:
            writes.append((self.group["buffers"], rows, buffers))
        if grad_norm is not None:
            writes.append((self.group["grad_norm"], rows, grad_norm))
        writes += [(self._scalar(name), rows, v) for name, v in (scalars or {}).items()]
        return writes

    def _hashes(self):
        if self._hash_array is None:
            self._hash_array = ensure_hash_array(self.group)
        return self._hash_array

    def block_shape(self, name: str = "params") -> tuple[int, int]:
        """Rows and columns of `name`'s unit of storage (its shard, else its chunk).

        Writing whole units (`write_block` at multiples of this shape) writes each stored
        object once.
        """
        array = self.group[name]
        shape = getattr(array, "shards", None) or array.chunks
        return int(shape[0]), int(shape[1])

    @property
    def chunk_steps(self) -> int:
        """Checkpoints per stored chunk (or shard) of `params` along `step`."""
        return self.block_shape("params")[0]

    def ensure_scalar(self, name: str) -> None:
        """Create the per-step scalar array `name` (and list it) if it does not exist."""
        self._scalar(name)

    def ensure_row_hashes(self) -> None:
        """Create the `row_hash` array if the group predates it."""
        self._hashes()

    def write_block(self, name: str, start: int, column: int, values: np.ndarray) -> None:
        """Write `values` `(rows, columns)` into `params` or `buffers` at `[start:, column:]`.

        For writers that stream a row in pieces (`ckpt import`); they store each row's
        content hash with `write_row_hashes` (see `integrity.row_hasher`) before `commit`.
        """
        if name not in ("params", "buffers"):
            raise ValueError(f"write_block writes params or buffers, not {name!r}")
        rows, cols = values.shape
        self.group[name][start:start + rows, column:column + cols] = values

    def write_row_hashes(self, start: int, digests: np.ndarray) -> None:
        """Store the content hashes `(rows, 32)` uint8 of rows `start:start+rows`."""
        self._hashes()[start:start + len(digests)] = digests

    def commit(self, rows: np.ndarray) -> None:
        """Mark `rows` (indices along `step`) complete; call only after `write_rows`."""
        rows = np.asarray(rows)
        if rows.size == 0:
            return
        if self.lock is not None:
            self.lock.check()  # a writer whose lease was taken over must not commit
        lo, hi = int(rows.min()), int(rows.max()) + 1
        flags = np.asarray(self._committed[lo:hi], dtype=bool)
        flags[rows - lo] = True
        self._committed[lo:hi] = flags

    def write_eval(self, index: int, metrics: Mapping[str, float]) -> None:
        """Write evaluation metrics at position `index` of `eval_step`.

        The first listed metric marks an evaluation as stored, so it is written last.
        """
        group = self.group
        if "eval_step" not in group:
            raise StoreError("this history was created without an evaluation schedule")
        for name in metrics:
            check_name(name)
            if name not in group:
                n = group["eval_step"].shape[0]
                group.create_array(
                    name, shape=(n,), chunks=(n,), dtype="float64", fill_value=np.nan,
                    dimension_names=("eval_step",),
                )
        listed = group.attrs[ATTRS_KEY].get("eval_metrics", [])
        new = [m for m in metrics if m not in listed]
        if new:
            self.update_attrs(eval_metrics=[*listed, *new])
        marker = group.attrs[ATTRS_KEY]["eval_metrics"][0]
        for name in sorted(metrics, key=lambda m: m == marker):
            group[name][index] = float(metrics[name])

    def save_resume_point(self, point: ResumePoint) -> None:
        """Store `point` as the group's resume point (rows up to its step are committed)."""
        write_resume_point(self.group, point)
        consolidate(self.root_path)

    def mark_complete(self) -> None:
        """Record that the history is finished and drop its resume state."""
        clear_resume_point(self.group)
        consolidate(self.root_path)

    def close(self) -> None:
        """Re-consolidate metadata so readers see everything written; release the lock."""
        try:
            consolidate(self.root_path)
        finally:
            self.release()

    def release(self) -> None:
        """Release the group's lock without touching the store (idempotent)."""
        if self.lock is not None:
            self.lock.release()
