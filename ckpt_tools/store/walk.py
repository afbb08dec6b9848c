"""The one walker over a store's group tree: every group of one ckpt-tools kind."""

from __future__ import annotations

import zarr

from ckpt_tools.store.layout import ATTRS_KEY

__all__ = ["groups_of_kind"]


def groups_of_kind(name: str, node: zarr.Group, kind: str, *, below_matches: bool = False
                   ) -> list[str]:
    """Paths of the groups at or below `node` whose ``attrs["ckpt_tools"]["kind"]`` is `kind`.

    Args:
        name: The path of `node` in the store ("" for the root).
        node: Where to start.
        kind: ``"history"``, ``"masks"``, ``"analysis"``, ...
        below_matches: Also look inside the groups found (a match ends its branch
            otherwise).

    Returns:
        The paths, sorted.
    """
    found, stack = [], [(name, node)]
    while stack:
        path, group = stack.pop()
        meta = group.attrs.get(ATTRS_KEY)
        if isinstance(meta, dict) and meta.get("kind") == kind:
            found.append(path)
            if not below_matches:
                continue
        stack.extend((f"{path}/{child}" if path else child, sub)
                     for child, sub in group.groups())
    return sorted(found)
