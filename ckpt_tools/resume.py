"""Continue an interrupted built-in run (`ckpt record --resume RUN.zarr`), bit for bit.

Everything a resume needs is in the store: the configuration in the history group's
attributes, the rows, and the latest resume point (see `ckpt_tools.store.resume`). The
resumed history is bitwise identical to an uninterrupted run on the same machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ckpt_tools.store import (
    StoreError,
    check_group_name,
    committed_count,
    read_group_meta,
    read_root,
)
from ckpt_tools.train import TrainConfig, TrainResult, train

__all__ = ["ResumeStatus", "resume_run", "resume_status"]

_FIELDS = frozenset(TrainConfig.__dataclass_fields__)


@dataclass(frozen=True)
class ResumeStatus:
    """Where a recorded built-in run stands.

    Attributes:
        config: The run's configuration, as stored.
        complete: The run finished; there is nothing to resume.
        from_step: The step of the latest resume point (None: none saved yet, so a
            resume starts again from the beginning and rewrites identical rows).
        stored_steps: Rows committed so far.
        intact: False when the group's creation itself was interrupted (no rows can
            exist); a resume then records it from scratch.
    """

    config: TrainConfig
    complete: bool
    from_step: int | None
    stored_steps: int
    intact: bool


def resume_status(path: str | Path, group: str = "train") -> ResumeStatus:
    """Inspect the run recorded in `group` of the store `path` (reads only).

    Raises:
        StoreError: no such store or group, or the group was not recorded by the
            built-in training loop (no configuration to resume from).
    """
    check_group_name(group)
    path = Path(path)
    read_root(path)
    try:
        meta = read_group_meta(path, group)
    except StoreError as exc:
        if not (path / group / "zarr.json").is_file():
            raise StoreError(f"{path} has no group '{group}' to resume; start the run with "
                             f"ckpt record --out {path}") from exc
        raise
    stored = meta.get("config")
    if meta.get("kind") != "history" or not isinstance(stored, dict) or "model" not in stored:
        raise StoreError(
            f"group '{group}' in {path} was not recorded by ckpt record (no training "
            "configuration); resume your own loop with Recorder(..., resume=True)"
        )
    if stored.get("start_step", 0) != 0 or set(stored) - {*_FIELDS, "start_step"}:
        raise StoreError(f"group '{group}' in {path} is part of an experiment; resume it "
                         "with the command that recorded it")
    try:
        config = TrainConfig.from_dict(stored)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"group '{group}' in {path} has a damaged configuration "
                         f"({exc})") from exc
    intact, count = committed_count(path, group)
    pointer = meta.get("resume") or {}
    step = pointer.get("step") if isinstance(pointer, dict) else None
    return ResumeStatus(
        config=config, complete=bool(meta.get("complete")) and intact,
        from_step=int(step) if isinstance(step, int) else None, stored_steps=count,
        intact=intact,
    )


def _check_overrides(config: TrainConfig, overrides: Mapping, path: Path) -> None:
    stored = config.to_dict()
    for key, value in overrides.items():
        if key not in stored:
            raise ValueError(f"--{key.replace('_', '-')} cannot be changed on --resume")
        want = list(value) if isinstance(value, tuple) else value
        if want != stored[key]:
            raise ValueError(
                f"--{key.replace('_', '-')} {value} differs from the run stored in {path} "
                f"({key}={stored[key]}); --resume continues the run as it was recorded"
            )


def resume_run(
    path: str | Path,
    *,
    group: str = "train",
    overrides: Mapping | None = None,
    on_step: Callable[[int, float], None] | None = None,
    resume_interval: float | None = 30.0,
) -> TrainResult:
    """Continue the built-in run recorded in `group` of `path` to its last step.

    Args:
        path: The store.
        group: The history group.
        overrides: Options given again on the command line; each must equal the stored
            value (a resume never changes a run).
        on_step: Called as ``on_step(step, loss)`` after every update.
        resume_interval: Seconds between resume points.

    Returns:
        The training result (``last_step`` is the run's final step).

    Raises:
        StoreError: see `resume_status`; or another writer holds the group.
        ValueError: an override differs from the stored configuration.
        TrainingInterrupted: stopped again by a signal (resume again).
    """
    path = Path(path)
    status = resume_status(path, group)
    _check_overrides(status.config, overrides or {}, path)
    if status.complete:
        return TrainResult(path, group, status.config.steps, {})
    return train(
        status.config, path, group=group, overwrite=not status.intact,
        resume=status.intact, on_step=on_step, resume_interval=resume_interval,
    )
