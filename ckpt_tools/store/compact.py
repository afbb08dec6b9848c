"""Compaction: compress a history recorded with ``codec="none"`` in place, chunk by chunk.

Zarr v3 gives an array one codec chain and one chunk grid, so a history cannot be half
in one layout and half in another, and writing a compressed copy beside it needs a
second store's worth of disk. Compaction needs neither, because the uncompressed layout
is the compressed one with blosc at level 0 (`layout.raw_compressor`): the same chunk
grid, the same time-major transpose, and blosc frames that describe themselves. A reader
decodes a level-0 frame and an LZ4 frame alike, whatever blosc settings the metadata
names. So, for each array stored uncompressed (`params`, `buffers`):

1. the array's ``zarr.json`` is rewritten to name the default codec (one atomic rename;
   no chunk decodes differently, so readers see the same values);
2. every stored chunk (or shard) file is read, decoded and written back with the new
   codec, in chunk-grid order; Zarr writes each file to a temporary name and renames it
   over the old one, so a reader sees the old file or the new one, both decoding to the
   same bits; the extra disk is one chunk or shard file at a time;
3. after each file, ``.compact.json`` in the group's directory records where to go on.

Killed at any point, the history reads the same; run it again and it continues from the
progress record (rewriting a file twice is harmless: it decodes to the same values).
Compaction holds the group's writer lock, so it never runs beside a recorder.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ckpt_tools.store.layout import StoreError, check_group_name, codec_of, lossless_compressor
from ckpt_tools.store.lock import GroupLock
from ckpt_tools.store.reader import history_groups, history_meta
from ckpt_tools.store.safety import load_metadata
from ckpt_tools.store.writer import consolidate, remove_partials

__all__ = ["PROGRESS_NAME", "CompactReport", "compact", "compact_store", "needs_compaction"]

PROGRESS_NAME = ".compact.json"
"""The progress record of an unfinished compaction, inside the group's directory."""

_ROW_ARRAYS = ("params", "buffers")


@dataclass(frozen=True)
class CompactReport:
    """What one `compact` call did to one history group.

    Attributes:
        group: The history group.
        arrays: The arrays rewritten (empty when there was nothing to do).
        files: Chunk or shard files rewritten.
        bytes_before: Bytes on disk of those arrays before this call.
        bytes_after: Bytes on disk of those arrays after it.
        largest_file: The largest file written: the disk a rewrite needs beyond the store.
        seconds: Wall time.
        resumed: Whether it continued an interrupted compaction.
    """

    group: str
    arrays: tuple[str, ...]
    files: int
    bytes_before: int
    bytes_after: int
    largest_file: int
    seconds: float
    resumed: bool


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _raw_arrays(folder: Path) -> list[str]:
    out = []
    for name in _ROW_ARRAYS:
        meta_file = folder / name / "zarr.json"
        if meta_file.is_file() and codec_of(load_metadata(meta_file).get("codecs", [])) == "none":
            out.append(name)
    return out


def needs_compaction(path: str | Path, group: str = "train") -> bool:
    """Whether the history `group` holds uncompressed arrays or an unfinished compaction.

    Raises:
        StoreError: if the store or the group is missing or not a history.
    """
    history_meta(path, group)
    folder = Path(path) / check_group_name(group)
    return (folder / PROGRESS_NAME).is_file() or bool(_raw_arrays(folder))


def _read_progress(folder: Path) -> dict[str, int] | None:
    file = folder / PROGRESS_NAME
    if not file.is_file():
        return None
    try:
        todo = json.loads(file.read_text())["next"]
        if all(n in _ROW_ARRAYS and isinstance(k, int) and k >= 0 for n, k in todo.items()):
            return dict(todo)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    # A damaged record only costs time: every rewrite is harmless, so start over.
    return dict.fromkeys(_ROW_ARRAYS, 0)


def _write_json(file: Path, doc: dict) -> None:
    tmp = file.with_name(file.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, file)


def _switch_codec(meta_file: Path, compressed: dict) -> None:
    """Make the array's metadata name the default blosc codec (no chunk decodes otherwise)."""
    doc = load_metadata(meta_file)

    def swap(codecs: list) -> list:
        out = []
        for codec in codecs:
            if codec.get("name") == "sharding_indexed":
                conf = dict(codec["configuration"])
                conf["codecs"] = swap(conf["codecs"])
                codec = {**codec, "configuration": conf}
            elif codec.get("name") == "blosc" and codec["configuration"].get("clevel") == 0:
                codec = compressed
            out.append(codec)
        return out

    new = {**doc, "codecs": swap(doc["codecs"])}
    if new != doc:
        _write_json(meta_file, new)


def _rewrite_files(
    array_dir: Path, start: int, done: Callable[[int, int], None]
) -> tuple[int, int]:
    """Re-encode every stored file of the array from grid index `start` on.

    Calls ``done(next_index, file_size)`` after each file rewritten. Returns (files,
    largest file written).
    """
    # Files whose chunks hold nothing but NaN are kept as files, so that no bit pattern
    # of a NaN stored there is replaced by the fill value's.
    array = zarr.open_array(str(array_dir), mode="r+", zarr_format=3).with_config(
        {"write_empty_chunks": True}
    )
    grid = array.metadata.chunk_grid.chunk_shape  # the shard shape when sharded
    counts = [math.ceil(s / g) for s, g in zip(array.shape, grid, strict=True)]
    files = largest = 0
    for index in range(start, math.prod(counts)):
        coords = tuple(int(c) for c in np.unravel_index(index, counts))
        file = array_dir / array.metadata.encode_chunk_key(coords)
        if not file.is_file():
            continue
        region = tuple(slice(c * g, min((c + 1) * g, s))
                       for c, g, s in zip(coords, grid, array.shape, strict=True))
        array[region] = array[region]
        size = file.stat().st_size
        files, largest = files + 1, max(largest, size)
        done(index + 1, size)
    return files, largest


def compact(
    path: str | Path,
    group: str = "train",
    *,
    on_file: Callable[[str, int], None] | None = None,
) -> CompactReport:
    """Compress the uncompressed arrays of one history group in place (see module doc).

    Args:
        path: The store.
        group: The history group.
        on_file: Called as ``on_file(array, bytes)`` after each file rewritten.

    Returns:
        What was done; ``arrays`` is empty when the group was already compressed.

    Raises:
        StoreError: the store or group is missing or not a history, or another process
            writes the group.
    """
    history_meta(path, group)
    folder = Path(path) / check_group_name(group)
    if folder.is_symlink():
        raise StoreError(f"{folder} is a symbolic link; refusing to write through it")
    started = time.monotonic()
    lock = GroupLock(folder, f"group '{group}' in {path}").acquire()
    try:
        remove_partials(folder)  # what a killed compaction or recorder left
        todo = _read_progress(folder)
        resumed = todo is not None
        if todo is None:
            todo = dict.fromkeys(_raw_arrays(folder), 0)
            if not todo:
                return CompactReport(group, (), 0, 0, 0, 0, time.monotonic() - started, False)
            _write_json(folder / PROGRESS_NAME, {"next": todo})
        before = sum(_du(folder / name) for name in todo)
        compressed = lossless_compressor().to_dict()
        files = largest = 0
        for name in list(todo):
            array_dir = folder / name
            if not (array_dir / "zarr.json").is_file():
                continue
            _switch_codec(array_dir / "zarr.json", compressed)

            def done(next_index: int, size: int, name: str = name) -> None:
                todo[name] = next_index
                _write_json(folder / PROGRESS_NAME, {"next": todo})
                if on_file is not None:
                    on_file(name, size)

            n, big = _rewrite_files(array_dir, todo[name], done)
            files, largest = files + n, max(largest, big)
        consolidate(path)
        (folder / PROGRESS_NAME).unlink()
        after = sum(_du(folder / name) for name in todo)
        return CompactReport(group, tuple(todo), files, before, after, largest,
                             time.monotonic() - started, resumed)
    finally:
        lock.release()


def compact_store(
    path: str | Path,
    groups: list[str] | None = None,
    *,
    on_file: Callable[[str, int], None] | None = None,
) -> list[CompactReport]:
    """`compact` each of `groups` (default: every history of the store), one at a time."""
    names = history_groups(path) if groups is None else groups
    return [compact(path, g, on_file=on_file) for g in names]

