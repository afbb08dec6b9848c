"""Creating or continuing the history group a `Recorder` writes (its attributes and checks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ckpt_tools.provenance import provenance
from ckpt_tools.schedule import Schedule
from ckpt_tools.store import HistoryWriter, StoreError, first_mismatch
from ckpt_tools.store.layout import ATTRS_KEY, to_json_safe
from ckpt_tools.tensors import TensorSpec

__all__ = ["check_matches", "create"]


def create(
    path: Path,
    group: str,
    *,
    model: str,
    schedule: Schedule,
    eval_schedule: Schedule | None,
    params: Sequence[TensorSpec],
    buffers: Sequence[TensorSpec],
    patterns: Mapping[str, tuple[str, ...] | None],
    config: Mapping | None,
    overwrite: bool,
    chunk_steps: int,
    codec: str,
    shard_bytes: int,
    optimizer_state: Sequence[str] = (),
) -> HistoryWriter:
    """Create the group with the attributes that say how it was recorded."""
    config = config or {}
    attrs = {
        "config": dict(config),
        "seed": config.get("seed"),
        "schedule": schedule.to_json(),
        "eval_schedule": eval_schedule.to_json() if eval_schedule else None,
        "model": model,
        "chunk_steps": chunk_steps,
        "include": patterns["include"],
        "exclude": patterns["exclude"],
        # CPU reductions split work by thread; an exact resume uses the same count.
        "torch_threads": torch.get_num_threads(),
    }
    return HistoryWriter.create(
        path, group, steps=schedule.steps, params=params, buffers=buffers, attrs=attrs,
        root_attrs=provenance(), eval_steps=eval_schedule.steps if eval_schedule else (),
        overwrite=overwrite, chunk_steps=chunk_steps, codec=codec, shard_bytes=shard_bytes,
        optimizer_state=optimizer_state,
    )


def check_matches(
    writer: HistoryWriter,
    *,
    where: str,
    params: Sequence[TensorSpec],
    buffers: Sequence[TensorSpec],
    schedule: Schedule,
    patterns: Mapping[str, tuple[str, ...] | None],
    config: Mapping | None,
    optimizer_state: Sequence[str] = (),
) -> None:
    """Refuse to continue a group recorded from another model, selection or configuration.

    Raises:
        StoreError: one line naming the first difference and what to do.
    """
    meta = writer.group.attrs[ATTRS_KEY]
    for key in ("include", "exclude"):
        stored = tuple(meta[key]) if meta.get(key) else None
        if stored != patterns[key]:
            raise StoreError(f"{where} was recorded with {key}={list(stored or [])}, not "
                             f"{list(patterns[key] or [])}; resume with the same tensor "
                             "selection")
    for kind, stored, ours in (("parameter", writer.params, params),
                               ("buffer", writer.buffers, buffers)):
        problem = first_mismatch(stored, ours, kind=kind)
        if problem:
            raise StoreError(f"{where} was recorded from another architecture: {problem}; "
                             "resume with the same model or record into a new store")
    if tuple(int(s) for s in writer.steps) != schedule.steps:
        raise StoreError(f"{where} has a different schedule")
    if tuple(meta.get("optimizer_state") or ()) != tuple(optimizer_state):
        raise StoreError(f"{where} was recorded with optimizer_state="
                         f"{list(meta.get('optimizer_state') or [])}, not "
                         f"{list(optimizer_state)}; resume with the same optimizer and "
                         "optimizer_state setting")
    if config is None:  # the caller does not say: nothing to compare
        return
    stored = meta.get("config", {})
    given = to_json_safe(dict(config))
    for key in sorted(set(stored) | set(given)):
        if stored.get(key) != given.get(key):
            raise StoreError(f"{where} was recorded with {key}={stored.get(key)!r}, not "
                             f"{given.get(key)!r}; resume with the stored configuration")
