"""Content hashes of rows, and the checks that find a mislabelled or incomplete series.

Every row of a history carries the SHA-256 of its stored values (`row_hash`, see
``docs/store-format.md``): the row's `params` as little-endian float32, followed by its
`buffers`. Two steps with the same hash hold the same weights, which is the signature of
a checkpoint saved under the wrong name (or of updates that did not change the weights).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import numpy as np
import zarr

from ckpt_tools.store.layout import ATTRS_KEY

__all__ = ["HASH_ARRAY", "HASH_BYTES", "ensure_hash_array", "history_warnings", "row_digests",
           "row_hasher"]

HASH_ARRAY = "row_hash"
"""Name of the `(step, hash_byte)` uint8 array holding each row's SHA-256."""

HASH_BYTES = 32

_SHOWN = 5  # steps quoted per warning line


def row_hasher():
    """A new SHA-256; feed it a row's params, then its buffers, as little-endian float32."""
    return hashlib.sha256()


def _le32(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype="<f4")


def row_digests(params: np.ndarray, buffers: np.ndarray) -> np.ndarray:
    """The content hash of each row of `params` `(rows, param)` and `buffers` `(rows, buffer)`.

    Returns:
        `(rows, HASH_BYTES)` uint8.
    """
    out = np.zeros((len(params), HASH_BYTES), dtype=np.uint8)
    for i in range(len(params)):
        h = row_hasher()
        h.update(_le32(params[i]))
        h.update(_le32(buffers[i]))
        out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return out


def ensure_hash_array(group: zarr.Group) -> zarr.Array:
    """The group's `row_hash` array, created (all zero: no hash) if the group predates it."""
    if HASH_ARRAY in group:
        return group[HASH_ARRAY]
    n = group["step"].shape[0]
    return group.create_array(
        HASH_ARRAY, shape=(n, HASH_BYTES), chunks=(max(min(n, 4096), 1), HASH_BYTES),
        dtype="uint8", fill_value=0, dimension_names=("step", "hash_byte"),
    )


def _steps_text(steps) -> str:
    steps = [int(s) for s in steps]
    more = f" and {len(steps) - _SHOWN} more" if len(steps) > _SHOWN else ""
    return ", ".join(str(s) for s in steps[:_SHOWN]) + more


def _schedule_steps(meta: dict, steps: np.ndarray) -> np.ndarray:
    text = meta.get("schedule")
    try:
        listed = json.loads(text)["steps"] if isinstance(text, str) else None
        return np.asarray(listed, dtype=np.int64) if listed is not None else steps
    except (ValueError, KeyError, TypeError):
        return steps


def history_warnings(node: zarr.Group) -> list[str]:
    """What looks wrong with a history's committed rows, one line per finding.

    - rows whose content hash equals another step's row (a mislabelled checkpoint);
    - steps that do not increase from row to row (out of order);
    - steps of the group's schedule between its first and last stored step that have no
      stored row (gaps);
    - stored rows without a content hash (written before hashes were stored).
    """
    meta = node.attrs.get(ATTRS_KEY, {})
    flags = np.asarray(node["committed"][:], dtype=bool)
    all_steps = np.asarray(node["step"][:], dtype=np.int64)
    rows = np.flatnonzero(flags)
    steps = all_steps[rows]
    found: list[str] = []
    if not len(steps):
        return found
    if HASH_ARRAY in node:
        hashes = np.asarray(node[HASH_ARRAY][:])[rows]
        unhashed = ~hashes.any(axis=1)
        same = defaultdict(list)
        for step, digest, missing in zip(steps, hashes, unhashed, strict=True):
            if not missing:
                same[digest.tobytes()].append(int(step))
        for group in same.values():
            if len(group) > 1:
                found.append(f"steps {_steps_text(group)} hold identical weights (same content "
                             "hash): a mislabelled checkpoint, or updates that changed nothing")
    else:
        unhashed = np.ones(len(steps), dtype=bool)
    if unhashed.any() and int(meta.get("ranks", 1)) <= 1:  # sharded rows have no hash
        found.append(f"{int(unhashed.sum())} stored rows have no content hash (written before "
                     "ckpt-tools stored them); duplicates among them are not checked")
    back = np.flatnonzero(np.diff(steps) <= 0)
    if back.size:
        pairs = [f"{steps[k + 1]} after {steps[k]}" for k in back[:_SHOWN]]
        more = f" and {back.size - _SHOWN} more" if back.size > _SHOWN else ""
        found.append(f"steps out of order: step {', step '.join(pairs)}{more}")
    expected = _schedule_steps(meta, all_steps)
    lo, hi = steps.min(), steps.max()
    inside = expected[(expected >= lo) & (expected <= hi)]
    gaps = np.setdiff1d(inside, steps)
    if gaps.size:
        found.append(f"{gaps.size} scheduled steps between {lo} and {hi} are missing: "
                     f"{_steps_text(gaps)}")
    off = np.setdiff1d(steps, expected)
    if off.size:
        found.append(f"{off.size} stored steps are not in the schedule: {_steps_text(off)}")
    return found
