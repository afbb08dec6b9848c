"""Resuming training bit for bit: the one module that owns it.

The built-in loop's data order and learning rate are pure functions of the config and
the step; what else it carries from one update to the next is captured here
(`capture`, `restore`): parameters and buffers (BatchNorm statistics and
``num_batches_tracked`` included), the SGD momentum buffers, torch's CPU generator (used
by dropout-like layers) and the intra-op thread count (CPU reductions split their work by
thread, so the count changes the last bits).

- `ResumePoints` decides when the loop saves a resume point (every `interval` seconds,
  and at once on SIGINT/SIGTERM through `StopOnSignal`), and `TrainingInterrupted` is
  what the loop raises once it has stopped there.
- `resume_status` and `resume_run` continue an interrupted ``ckpt record`` run
  (``ckpt record --resume RUN.zarr``) from what the store holds: the configuration in
  the history group's attributes, the rows, and the latest resume point (stored by
  `ckpt_tools.store.resume`). The resumed history is bitwise identical to an
  uninterrupted run on the same machine.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ckpt_tools.config import TrainConfig
from ckpt_tools.sharded import is_sharded
from ckpt_tools.store import (
    Location,
    ResumePoint,
    StoreError,
    as_location,
    check_group_name,
    committed_count,
    read_group_meta,
    read_root,
)
from ckpt_tools.tensors import buffer_specs, param_specs, split_row

if TYPE_CHECKING:
    from ckpt_tools.train import TrainResult

_FIELDS = frozenset(TrainConfig.__dataclass_fields__)

__all__ = [
    "ResumePoints",
    "ResumeStatus",
    "StopOnSignal",
    "TrainingInterrupted",
    "capture",
    "match_threads",
    "restore",
    "resume_run",
    "resume_status",
]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM at a step boundary, with a resume point saved.

    Attributes:
        step: The last completed update (the resume point's step).
        exit_code: 130 for SIGINT, 143 for SIGTERM (128 + the signal number).
    """

    def __init__(self, message: str, *, step: int, signum: int):
        super().__init__(message)
        self.step = step
        self.exit_code = 128 + signum


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    # numpy's single-threaded copy: ~10x faster than torch.cat on busy CPU cores.
    parts = [t.detach().reshape(-1).float().cpu().numpy() for t in tensors]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def capture(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    info: Mapping | None = None,
) -> ResumePoint:
    """Copy the state needed to continue training bit for bit after `step` updates.

    Args:
        step: Updates done so far.
        model: The model (its ``named_parameters`` and ``state_dict`` buffers).
        optimizer: An optimizer whose per-parameter state is at most a
            ``momentum_buffer`` (SGD).
        info: Extra JSON-able bookkeeping to store with the point (e.g. ``last_eval``).

    Returns:
        A `ResumePoint` of copies (safe to hand to a background writer).

    Raises:
        ValueError: the model is sharded (FSDP): a point holds the whole model.
    """
    if is_sharded(model):
        raise ValueError("a resume point holds the whole model, and this one is sharded "
                         "(FSDP): save its training state with torch.distributed.checkpoint"
                         " and continue the history with Recorder(..., resume=True)")
    params = [p for _, p in model.named_parameters()]
    state = model.state_dict()
    buffers = [state[s.name] for s in buffer_specs(model)]
    momentum, has = [], []
    for p in params:
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        has.append(buf is not None)
        momentum.append(buf if buf is not None else torch.full_like(p, float("nan")))
    return ResumePoint(
        step=int(step),
        params=_flat(params),
        buffers=_flat(buffers),
        momentum=_flat(momentum),
        has_momentum=tuple(has),
        rng=torch.get_rng_state().numpy().copy(),
        info={"threads": torch.get_num_threads(), **dict(info or {})},
    )


def restore(point: ResumePoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put `point` back into `model` and `optimizer` (and torch's CPU generator).

    Args:
        point: What `capture` took.
        model: A model of the architecture the point was captured from (check it against
            the store first, e.g. with `ckpt_tools.store.check_model`).
        optimizer: A fresh optimizer over ``model.parameters()``.

    Raises:
        StoreError: the point's sizes do not fit the model.
    """
    p_specs, b_specs = param_specs(model), buffer_specs(model)
    sizes = (sum(s.size for s in p_specs), sum(s.size for s in b_specs), len(p_specs))
    if (point.params.size, point.buffers.size, len(point.has_momentum)) != sizes or (
        point.momentum.size != sizes[0]
    ):
        raise StoreError("the resume point does not fit the model (sizes differ); "
                         "record the run again with --overwrite")
    device = next(iter(model.parameters())).device
    model.load_state_dict({**split_row(point.params, p_specs), **split_row(point.buffers, b_specs)})
    momentum = split_row(point.momentum, p_specs)
    for (name, p), has in zip(model.named_parameters(), point.has_momentum, strict=True):
        if has:
            optimizer.state[p]["momentum_buffer"] = momentum[name].to(device).clone()
    if point.rng.size:
        torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(point.rng, dtype=np.uint8)))
    threads = point.info.get("threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


class StopOnSignal:
    """While active, SIGINT and SIGTERM set `signum` instead of killing the loop.

    A second signal of either kind restores the default behaviour (a second Ctrl-C
    interrupts at once). Outside the main thread, signals are left alone.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def interrupted(self, step: int, out: str | Path, group: str) -> TrainingInterrupted:
        """The exception to raise once the loop has stopped after `step`."""
        name = signal.Signals(self.signum or signal.SIGINT).name
        hint = (f"ckpt record --resume {out}" if group == "train"
                else "the same command again (stored runs are skipped, this one resumes)")
        return TrainingInterrupted(
            f"stopped by {name} after step {step}; everything recorded up to it is stored in "
            f"{out} (group '{group}'); continue with: {hint}",
            step=step, signum=self.signum or signal.SIGINT,
        )


def match_threads(out: str | Path, group: str) -> None:
    """Set torch's intra-op thread count to the one `group` was recorded with.

    CPU reductions split their work by thread, so the count changes the last bits; a
    resume sets it before the model is built.
    """
    threads = read_group_meta(out, group).get("torch_threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


class ResumePoints:
    """When the training loop saves a resume point: every `interval` seconds, and on signal.

    Use as a context manager around the loop: while active, SIGINT and SIGTERM ask the loop
    to stop at the next step boundary (`StopOnSignal`).

    Args:
        interval: Seconds between resume points (0: after every update; None: none,
            except when stopped by a signal).
    """

    def __init__(self, interval: float | None = 30.0):
        self.interval = interval
        self.signals = StopOnSignal()
        self._next = 0.0

    def __enter__(self) -> ResumePoints:
        self.signals.__enter__()
        self._next = time.monotonic() + (self.interval or 0.0)
        return self

    def __exit__(self, *exc) -> None:
        self.signals.__exit__(*exc)

    @property
    def stopping(self) -> bool:
        """A signal asked the loop to stop."""
        return self.signals.signum is not None

    def due(self) -> bool:
        """Whether to save a resume point now (the interval passed, or a signal came)."""
        timed = self.interval is not None and time.monotonic() >= self._next
        return timed or self.stopping

    def saved(self) -> None:
        """Start the next interval (call after saving a point)."""
        self._next = time.monotonic() + (self.interval or 0.0)

    def interrupted(self, step: int, out: str | Path, group: str) -> TrainingInterrupted:
        """The exception to raise once the loop has stopped after `step`."""
        return self.signals.interrupted(step, out, group)




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


def resume_status(path: str | Path | Location, group: str = "train") -> ResumeStatus:
    """Inspect the run recorded in `group` of the store `path` (reads only).

    Raises:
        StoreError: no such store or group, or the group was not recorded by the
            built-in training loop (no configuration to resume from).
    """
    check_group_name(group)
    path = as_location(path)
    read_root(path)
    try:
        meta = read_group_meta(path, group)
    except StoreError as exc:
        if not path.is_file(f"{group}/zarr.json"):
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


def _check_overrides(config: TrainConfig, overrides: Mapping, path: Location) -> None:
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
    path: str | Path | Location,
    *,
    group: str = "train",
    overrides: Mapping | None = None,
    on_step: Callable[[int, float], None] | None = None,
    resume_interval: float | None = 30.0,
    recorder_options: Mapping | None = None,
) -> TrainResult:
    """Continue the built-in run recorded in `group` of `path` to its last step.

    Args:
        path: The store.
        group: The history group.
        overrides: Options given again on the command line; each must equal the stored
            value (a resume never changes a run).
        on_step: Called as ``on_step(step, loss)`` after every update.
        resume_interval: Seconds between resume points.
        recorder_options: Extra keyword arguments of `Recorder` (see `train`).

    Returns:
        The training result (``last_step`` is the run's final step).

    Raises:
        StoreError: see `resume_status`; or another writer holds the group.
        ValueError: an override differs from the stored configuration.
        TrainingInterrupted: stopped again by a signal (resume again).
    """
    from ckpt_tools.train import TrainResult, train

    path = as_location(path)
    status = resume_status(path, group)
    _check_overrides(status.config, overrides or {}, path)
    if status.complete:
        return TrainResult(path.path if path.is_local else path, group, status.config.steps, {})
    return train(
        status.config, path, group=group, overwrite=not status.intact,
        resume=status.intact, on_step=on_step, resume_interval=resume_interval,
        recorder_options=recorder_options,
    )
