"""Experiment groups of stores written before they all moved under ``experiments/<name>/``.

Stores recorded by earlier versions hold IMP and instability groups at the top level
(``imp/...``, ``instability/...``). `LEGACY` maps today's prefix to the older one;
`locate` finds a group under either, so such stores still read; an experiment continued
on one adds its new groups under today's paths, and its summaries gather both. Tested on
a committed store of the older layout (``tests/data/legacy_layout.tar.gz``).

Pre-training groups need no map: earlier versions trained the real task for all T
updates after pre-training, and ``ckpt pretrain --real-task full`` writes exactly those
groups (same paths, same ``config.experiment`` attributes), so an older store's
pre-training runs read as the ``<task>_full`` conditions of the summary and continue
with ``--real-task full``; the default ``from-n`` runs go under ``from_n/`` beside them.
"""

from __future__ import annotations

from pathlib import Path

from ckpt_tools.store import StoreError, read_group_meta

__all__ = ["LEGACY", "current_name", "legacy_name", "locate"]

LEGACY: dict[str, str] = {
    "experiments/imp/": "imp/",
    "experiments/instability/": "instability/",
}
"""Today's group prefix -> the prefix earlier stores used."""


def legacy_name(group: str) -> str | None:
    """The path `group` had in the older layout, or None if it did not move."""
    for new, old in LEGACY.items():
        if group.startswith(new):
            return old + group.removeprefix(new)
    return None


def current_name(group: str) -> str:
    """Today's path of a group found in a store of either layout."""
    for new, old in LEGACY.items():
        if group.startswith(old):
            return new + group.removeprefix(old)
    return group


def _exists(store: str | Path, group: str) -> bool:
    try:
        read_group_meta(store, group)
    except StoreError:
        return False
    return True


def locate(store: str | Path, group: str) -> str:
    """`group` as `store` holds it: today's path, or the older one when only that exists.

    A group that exists under neither gets today's path (where it will be written).
    """
    if _exists(store, group):
        return group
    old = legacy_name(group)
    return old if old is not None and _exists(store, old) else group
