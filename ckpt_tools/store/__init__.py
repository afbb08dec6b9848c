"""The store: the only part of ckpt-tools that touches Zarr.

Layout and guarantees are documented in ``docs/store-format.md``.
"""

from ckpt_tools.store.chunks import ChunkReader
from ckpt_tools.store.compat import check_model, check_state_dict, first_mismatch
from ckpt_tools.store.integrity import HASH_ARRAY, row_digests, row_hasher
from ckpt_tools.store.layout import (
    ATTRS_KEY,
    CHUNK_STEPS,
    FORMAT_VERSION,
    Codec,
    StoreError,
    check_group_name,
    check_name,
)
from ckpt_tools.store.location import Location, LocationError, as_location, parse_storage_options
from ckpt_tools.store.lock import GroupLock
from ckpt_tools.store.reader import (
    committed_count,
    history_check,
    history_groups,
    history_meta,
    last_evaluations,
    open_chunks,
    open_history,
    open_tree,
    read_root,
    read_row,
    store_info,
)
from ckpt_tools.store.results import list_results, read_result, result_path, write_result
from ckpt_tools.store.resume import ResumePoint, read_group_meta, read_resume_point
from ckpt_tools.store.safety import check_store
from ckpt_tools.store.writer import HistoryWriter, consolidate, remove_partials

__all__ = [
    "ATTRS_KEY",
    "ChunkReader",
    "CHUNK_STEPS",
    "Codec",
    "FORMAT_VERSION",
    "GroupLock",
    "HASH_ARRAY",
    "HistoryWriter",
    "Location",
    "LocationError",
    "ResumePoint",
    "StoreError",
    "as_location",
    "check_group_name",
    "check_model",
    "check_name",
    "check_state_dict",
    "check_store",
    "consolidate",
    "first_mismatch",
    "committed_count",
    "history_check",
    "history_groups",
    "history_meta",
    "last_evaluations",
    "list_results",
    "open_chunks",
    "open_history",
    "parse_storage_options",
    "open_tree",
    "read_group_meta",
    "read_result",
    "read_resume_point",
    "read_row",
    "read_root",
    "remove_partials",
    "result_path",
    "row_digests",
    "row_hasher",
    "store_info",
    "write_result",
]
