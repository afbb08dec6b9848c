"""Existing checkpoint series into a history group: ``ckpt import``.

    import_checkpoints(out, checkpoints, group=...)   check, then stream into a store
    find_checkpoints([paths])                         files and folders -> checkpoints
    hub_checkpoints(repo, revisions)                  revisions in the Hugging Face cache
    CheckpointError                                   one-line errors about sources

Formats: ``docs/integrations.md``. Reading safetensors needs the ``hub`` extra.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckpt_tools.importer.formats import Checkpoint, CheckpointError, find_checkpoints
from ckpt_tools.importer.hub import hub_checkpoints
from ckpt_tools.importer.series import Series, plan_series
from ckpt_tools.importer.write import write_series
from ckpt_tools.provenance import provenance
from ckpt_tools.schedule import Schedule
from ckpt_tools.store import HistoryWriter, as_location, consolidate, history_check

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ImportReport",
    "find_checkpoints",
    "hub_checkpoints",
    "import_checkpoints",
    "plan_series",
]


IMPORT_SHARD_BYTES = 1 << 26
"""64 MiB raw per shard: writing a shard costs Zarr about three times its raw size in
memory, so imports use shards an eighth of the default size (see docs/performance.md)."""


@dataclass(frozen=True)
class ImportReport:
    """What `import_checkpoints` stored.

    Attributes:
        group: The history group written.
        steps: The step of each row, in row order.
        parameters: Values per row in `params`; `buffer_elements` likewise in `buffers`.
        notes: Names that disagree with their checkpoint's metadata.
        warnings: The integrity checks of the group (as `ckpt info` prints them).
    """

    group: str
    steps: tuple[int, ...]
    parameters: int
    buffer_elements: int
    notes: tuple[str, ...]
    warnings: tuple[str, ...]


def _model_name(series: Series) -> str:
    config = series.rows[0].checkpoint.config
    if config is not None:
        try:
            data = json.loads(config.read_text())
            names = data.get("architectures") or [data.get("model_type")]
            if names and isinstance(names[0], str):
                return names[0]
        except (OSError, ValueError, AttributeError):
            pass
    return series.rows[0].checkpoint.kind


def _attrs(series: Series, schedule: Schedule | None, step_regex: str | None) -> dict:
    kinds = sorted({r.checkpoint.kind for r in series.rows})
    return {
        "config": {"imported": ", ".join(kinds), "checkpoints": len(series.rows),
                   "step_regex": step_regex},
        "seed": None,
        "schedule": schedule.to_json() if schedule is not None else None,
        "eval_schedule": None,
        "model": _model_name(series),
        "imported_from": [
            {"source": r.checkpoint.label, "format": r.checkpoint.kind, "step": r.step,
             "step_from": r.step_from}
            for r in series.rows
        ],
    }


def import_checkpoints(
    out: str | Path,
    checkpoints: Sequence[Checkpoint],
    *,
    group: str = "train",
    step_regex: str | None = None,
    schedule: Schedule | str | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    shard_bytes: int = IMPORT_SHARD_BYTES,
) -> ImportReport:
    """Store a series of checkpoints as the history group `group` of the store `out`.

    Every checkpoint is checked before the store is touched (see `plan_series`); rows are
    then streamed in bit for bit (half-precision values as the float32 numbers they are,
    with the original dtype in the tensor tables, so `load_state_dict` returns them in
    it). If writing fails, a store or group this call created is removed again.

    Args:
        out: The store (created if missing).
        checkpoints: The series (`find_checkpoints`, `hub_checkpoints`).
        group: The history group to create.
        step_regex: Reads a step from a name whose metadata has none (first group).
        schedule: The schedule the series was saved on; gaps against it are reported.
        overwrite: Replace an existing group of the same name.
        progress: Called with the number of rows stored so far.
        shard_bytes: Raw bytes of a shard at most, for rows large enough to be sharded
            (see `ckpt_tools.store.layout.row_array_layout`): the import holds one
            shard's rows in memory while it is written, plus Zarr's encoding copies.

    Raises:
        CheckpointError: a source is unreadable, or the series does not fit together.
        StoreError: the store refuses the group (it exists, the path is not a store).
    """
    series = plan_series(checkpoints, step_regex=step_regex)
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    out = as_location(out)
    store_existed, group_existed = out.exists(), out.exists(group)
    writer = HistoryWriter.create(
        out, group, steps=[r.step for r in series.rows], params=series.params,
        buffers=series.buffers, attrs=_attrs(series, schedule, step_regex),
        root_attrs=provenance(), overwrite=overwrite, shard_bytes=shard_bytes,
    )
    try:
        write_series(writer, series, progress=progress)
    except BaseException:
        writer.release()
        if not store_existed:
            out.remove("", recursive=True)
        elif not group_existed:
            out.remove(group, recursive=True)
            consolidate(out)
        raise
    writer.close()
    return ImportReport(
        group=group,
        steps=tuple(r.step for r in series.rows),
        parameters=series.params[-1].stop if series.params else 0,
        buffer_elements=series.buffers[-1].stop if series.buffers else 0,
        notes=series.notes,
        warnings=tuple(history_check(out, group)),
    )
