"""Pruning masks in a store: one boolean `(level, param)` array per pruning lineage.

A mask group (e.g. ``imp/rewind_100/seed_0/masks``) holds

- ``mask (level, param)`` bool: True where the weight survives; `param` is the flat
  parameter axis of the history groups (all parameters, in ``named_parameters`` order;
  parameters that are never pruned are True everywhere);
- ``level (level)`` int64 coordinate (0, 1, 2, ...);
- ``written (level)`` bool: the row is complete (set after the row is written, so a
  crash mid-write never leaves a row that reads as a real mask).

The group's attributes (key ``ckpt_tools``) hold ``kind="masks"``, the parameter table
and the settings that produced the masks. Rows are written level by level; the arrays
grow as levels are added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ckpt_tools.store.layout import ATTRS_KEY, StoreError, check_group_name, to_json_safe
from ckpt_tools.store.reader import read_root
from ckpt_tools.store.walk import groups_of_kind
from ckpt_tools.store.writer import consolidate, open_root_for_writing
from ckpt_tools.tensors import TensorSpec, specs_from_json, specs_to_json

__all__ = [
    "MaskSet",
    "mask_levels",
    "read_mask_row",
    "mask_groups",
    "read_mask_settings",
    "read_masks",
    "write_mask_row",
]


def _mask_group(path: str | Path, group: str) -> zarr.Group | None:
    check_group_name(group)
    root = read_root(path)
    if group not in root:
        return None
    node = root[group]
    if not isinstance(node, zarr.Group) or node.attrs.get(ATTRS_KEY, {}).get("kind") != "masks":
        raise StoreError(f"group '{group}' in {path} is not a mask group")
    return node


def mask_groups(path: str | Path, under: str) -> list[str]:
    """Paths of every mask group at or below the group `under` (empty if it is missing)."""
    check_group_name(under)
    root = read_root(path)
    if under not in root or not isinstance(root[under], zarr.Group):
        return []
    return groups_of_kind(under, root[under], "masks")


def write_mask_row(
    path: str | Path,
    group: str,
    level: int,
    row: np.ndarray,
    *,
    params: Sequence[TensorSpec],
    settings: Mapping,
) -> None:
    """Write the mask of `level` into the mask group `group`, creating the group if needed.

    Args:
        path: The store.
        group: The mask group path, e.g. ``"imp/rewind_100/seed_0/masks"``.
        level: The pruning level (>= 0).
        row: Bool `(param,)`: True where the weight survives.
        params: The parameter table of the model the mask belongs to.
        settings: JSON-able settings that produced the masks (stored on creation).

    Raises:
        StoreError: the group exists with another parameter table or other settings.
    """
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    row = np.asarray(row, dtype=bool)
    n = sum(s.size for s in params)
    if row.shape != (n,):
        raise ValueError(f"mask row has shape {row.shape}, expected ({n},)")
    check_group_name(group)
    node = _mask_group(path, group)
    settings = to_json_safe(dict(settings))
    if node is None:
        root = open_root_for_writing(path, {})
        node = root.create_group(group)
        node.create_array(
            "mask", shape=(0, n), chunks=(1, max(n, 1)), dtype="bool", fill_value=False,
            dimension_names=("level", "param"),
        )
        node.create_array(
            "level", shape=(0,), chunks=(1024,), dtype="int64", fill_value=-1,
            dimension_names=("level",),
        )
        node.create_array(
            "written", shape=(0,), chunks=(1024,), dtype="bool", fill_value=False,
            dimension_names=("level",),
        )
        node.attrs[ATTRS_KEY] = {
            "kind": "masks", "params": specs_to_json(params), "settings": settings,
        }
    else:
        node = open_root_for_writing(path, {})[group]
        meta = node.attrs[ATTRS_KEY]
        if [(s.name, s.shape) for s in specs_from_json(meta["params"])] != [
            (s.name, s.shape) for s in params
        ]:
            raise StoreError(f"mask group '{group}' in {path} belongs to another architecture")
        if meta.get("settings") != settings:
            raise StoreError(
                f"mask group '{group}' in {path} was made with other settings "
                f"({meta.get('settings')}); use a new store or remove the group"
            )
    size = node["mask"].shape[0]
    if level >= size:
        node["mask"].resize((level + 1, n))
        node["level"].resize((level + 1,))
        node["written"].resize((level + 1,))
        node["level"][:] = np.arange(level + 1, dtype=np.int64)
    node["mask"][level] = row
    node["written"][level] = True
    consolidate(path)


def mask_levels(path: str | Path, group: str) -> list[int]:
    """Levels whose mask rows are complete in `group` (empty if the group is missing)."""
    node = _mask_group(path, group)
    if node is None:
        return []
    return [int(i) for i in np.flatnonzero(np.asarray(node["written"][:], dtype=bool))]


def read_mask_row(path: str | Path, group: str, level: int) -> tuple[np.ndarray, list[TensorSpec]]:
    """The mask of `level` as a bool `(param,)` row, with the parameter table.

    Raises:
        StoreError: the group or the level is missing (the message lists stored levels).
    """
    node = _mask_group(path, group)
    if node is None:
        raise StoreError(f"{path} has no mask group '{group}'", hint="run `ckpt imp` first")
    written = np.asarray(node["written"][:], dtype=bool)
    if not (0 <= level < len(written) and written[level]):
        levels = ", ".join(str(i) for i in np.flatnonzero(written)) or "none"
        raise StoreError(f"level {level} has no mask in '{group}' of {path}; stored levels: "
                         f"{levels}")
    row = np.asarray(node["mask"][level], dtype=bool)
    return row, specs_from_json(node.attrs[ATTRS_KEY]["params"])


@dataclass(frozen=True)
class MaskSet:
    """Every mask of one mask group.

    Attributes:
        masks: Bool `(level, param)`; rows whose `written` is False are not masks.
        written: Bool `(level,)`: which rows are complete.
        params: The parameter table.
        settings: The settings stored with the group.
    """

    masks: np.ndarray
    written: np.ndarray
    params: list[TensorSpec]
    settings: dict

    @property
    def levels(self) -> list[int]:
        """The levels whose masks are complete."""
        return [int(i) for i in np.flatnonzero(self.written)]


def read_masks(path: str | Path, group: str) -> MaskSet | None:
    """All masks of the group `group` in one read, or None if the group is missing."""
    node = _mask_group(path, group)
    if node is None:
        return None
    meta = node.attrs[ATTRS_KEY]
    return MaskSet(
        masks=np.asarray(node["mask"][...], dtype=bool),
        written=np.asarray(node["written"][...], dtype=bool),
        params=specs_from_json(meta["params"]),
        settings=dict(meta.get("settings", {})),
    )


def read_mask_settings(path: str | Path, group: str) -> dict | None:
    """The settings stored with a mask group, or None if the group is missing."""
    node = _mask_group(path, group)
    return None if node is None else dict(node.attrs[ATTRS_KEY].get("settings", {}))
