"""Resume points: the exact training state at one step, kept in two slots per history.

A resume point holds what a training loop needs beyond the data order and the learning
rate (both pure functions of the config and the step) to continue bit for bit: the
parameters and buffers, the optimizer's momentum buffers, the torch CPU generator state
and a small JSON `info` (thread count, the last evaluation). It lives in the history
group as four arrays with a leading ``resume_slot`` dimension of length 2::

    resume_params    (resume_slot, param)     float32
    resume_buffers   (resume_slot, buffer)    float32
    resume_momentum  (resume_slot, param)     float32, NaN where a tensor has none yet
    resume_rng       (resume_slot, rng_byte)  uint8

and a pointer in the group attributes, ``ckpt_tools.resume = {"slot", "step", ...}``.
A new point is written into the slot the pointer does not name, and only then does the
pointer switch (one atomic rewrite of the group's ``zarr.json``). A crash at any moment
leaves the pointer on a complete point; rows up to its step are committed before it is
written. A finished run drops the arrays and the pointer and sets ``complete``, so a
finished store carries no resume state.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from ckpt_tools.store.layout import (
    ATTRS_KEY,
    PARAM_CHUNK,
    StoreError,
    check_group_name,
    lossless_compressor,
    to_json_safe,
)
from ckpt_tools.store.location import Location, as_location

__all__ = [
    "RESUME_ARRAYS",
    "ResumePoint",
    "clear_resume_point",
    "read_group_meta",
    "read_resume_point",
    "write_resume_point",
]

RESUME_ARRAYS = ("resume_params", "resume_buffers", "resume_momentum", "resume_rng")
"""Names of the resume-state arrays in a history group (hidden from xarray views)."""

_SLOTS = 2


@dataclass(frozen=True)
class ResumePoint:
    """The exact state of a training loop after `step` updates.

    Attributes:
        step: Updates done.
        params: `(param,)` float32, every parameter flattened as in the rows.
        buffers: `(buffer,)` float32, as in the rows.
        momentum: `(param,)` float32 optimizer momentum; NaN where `has_momentum` is False.
        has_momentum: Per parameter tensor: whether it has a momentum buffer yet.
        rng: `(n,)` uint8, ``torch.get_rng_state()``.
        info: JSON-able extras (``threads``, ``last_eval``, ...).
    """

    step: int
    params: np.ndarray
    buffers: np.ndarray
    momentum: np.ndarray
    has_momentum: tuple[bool, ...]
    rng: np.ndarray
    info: Mapping = field(default_factory=dict)


def _slot_array(group: zarr.Group, name: str, n: int, dim: str, dtype: str) -> zarr.Array:
    if name in group:
        arr = group[name]
        if arr.shape == (_SLOTS, n):
            return arr
        del group[name]
    return group.create_array(
        name, shape=(_SLOTS, n), chunks=(1, min(max(n, 1), PARAM_CHUNK)), dtype=dtype,
        fill_value=np.nan if dtype == "float32" else 0,
        dimension_names=("resume_slot", dim), compressors=[lossless_compressor()],
    )


def write_resume_point(group: zarr.Group, point: ResumePoint) -> None:
    """Store `point` in the free slot of `group`, then switch the pointer to it.

    Call only after every row up to ``point.step`` is committed. Needs the group's writer
    lock. Re-consolidating the store's metadata is the caller's job.
    """
    meta = dict(group.attrs[ATTRS_KEY])
    current = meta.get("resume") or {}
    slot = 1 - int(current.get("slot", 1))
    arrays = {
        "resume_params": (point.params, "param", "float32"),
        "resume_buffers": (point.buffers, "buffer", "float32"),
        "resume_momentum": (point.momentum, "param", "float32"),
        "resume_rng": (point.rng, "rng_byte", "uint8"),
    }
    for name, (values, dim, dtype) in arrays.items():
        values = np.asarray(values, dtype=dtype).reshape(-1)
        arr = _slot_array(group, name, values.size, dim, dtype)
        if values.size:
            arr[slot] = values
    meta["resume"] = to_json_safe({
        "slot": slot,
        "step": int(point.step),
        "has_momentum": [bool(b) for b in point.has_momentum],
        "info": dict(point.info),
        "saved": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    })
    meta["complete"] = False
    group.attrs[ATTRS_KEY] = meta


def clear_resume_point(group: zarr.Group) -> None:
    """Mark the history complete and drop its resume state (needs the writer lock)."""
    meta = dict(group.attrs[ATTRS_KEY])
    meta["resume"] = None
    meta["complete"] = True
    group.attrs[ATTRS_KEY] = meta
    for name in RESUME_ARRAYS:
        if name in group:
            del group[name]


def read_group_meta(path: str | Path | Location, group: str) -> dict:
    """The group's ``ckpt_tools`` attributes, read from its own ``zarr.json``.

    Unlike the consolidated copy, this is never stale: writers update it first.

    Raises:
        StoreError: the group is missing or its metadata is unreadable.
    """
    check_group_name(group)
    path = as_location(path)
    meta_file = path.child(f"{group}/zarr.json")
    try:
        doc = json.loads(path.read_bytes(f"{group}/zarr.json").decode())
    except FileNotFoundError:
        raise StoreError(f"{path} has no group '{group}'") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{meta_file}: unreadable metadata ({exc.__class__.__name__})") from exc
    meta = doc.get("attributes", {}).get(ATTRS_KEY) if isinstance(doc, dict) else None
    if not isinstance(meta, dict):
        raise StoreError(f"group '{group}' in {path} has no ckpt-tools attributes")
    return meta


def read_resume_point(path: str | Path | Location, group: str = "train") -> ResumePoint | None:
    """The latest resume point of a history group, or None if it has none.

    Raises:
        StoreError: the group is missing, or its resume state is damaged.
    """
    meta = read_group_meta(path, group)
    pointer = meta.get("resume")
    if not pointer:
        return None
    where = f"resume point of group '{group}' in {path}"
    try:
        slot, step = int(pointer["slot"]), int(pointer["step"])
        has = tuple(bool(b) for b in pointer["has_momentum"])
        info = dict(pointer.get("info") or {})
        if slot not in range(_SLOTS) or step < 0:
            raise ValueError(slot)
        node = zarr.open_group(as_location(path).child(group).open_target(read_only=True),
                               mode="r", use_consolidated=False)
        values = {name: np.asarray(node[name][slot]) for name in RESUME_ARRAYS}
    except Exception as exc:  # any damage to the pointer or the slot arrays
        raise StoreError(f"{where} is unreadable ({exc.__class__.__name__}); "
                         "record the run again with --overwrite") from exc
    return ResumePoint(
        step=step, params=values["resume_params"], buffers=values["resume_buffers"],
        momentum=values["resume_momentum"], has_momentum=has, rng=values["resume_rng"],
        info=info,
    )
