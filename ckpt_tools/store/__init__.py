"""The store: the only part of ckpt-tools that touches Zarr.

Layout and guarantees are documented in ``docs/store-format.md``.
"""

from ckpt_tools.store.layout import (
    ATTRS_KEY,
    CHUNK_STEPS,
    FORMAT_VERSION,
    StoreError,
    check_group_name,
)
from ckpt_tools.store.reader import (
    history_groups,
    open_history,
    open_tree,
    read_root,
    read_row,
    store_info,
)
from ckpt_tools.store.writer import HistoryWriter, consolidate

__all__ = [
    "ATTRS_KEY",
    "CHUNK_STEPS",
    "FORMAT_VERSION",
    "HistoryWriter",
    "StoreError",
    "check_group_name",
    "consolidate",
    "history_groups",
    "open_history",
    "open_tree",
    "read_row",
    "read_root",
    "store_info",
]
