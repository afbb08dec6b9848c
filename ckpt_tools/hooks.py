"""What the built-in training loop calls at its fixed points, and the hooks it ships with.

`ckpt_tools.train.train` runs the optimisation; everything else a run needs (recording,
masks, progress, your own bookkeeping) is a `Hook`. The loop calls, in list order:

- ``on_start(state)``: the model is built and initialised (or restored from a resume
  point: ``state.resumed``), the optimizer made; nothing of this run is recorded yet.
- ``before_update(state, step)``: gradients of update `step` are computed, the optimizer
  has not stepped.
- ``after_update(state, step, loss)``: the optimizer stepped (`loss`: the update's finite
  minibatch loss).
- ``on_evaluation(state, step, metrics)``: at the steps of the evaluation schedule
  (including the start step of a fresh run), with the test metrics.
- ``on_resume_point(state, point)``: a resume point was captured (`ckpt_tools.resume`).
- ``on_end(state, completed)``: the loop finished (`completed`), or stops on divergence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ckpt_tools import batches
from ckpt_tools.config import TrainConfig
from ckpt_tools.data import ImageData
from ckpt_tools.recorder import Recorder
from ckpt_tools.store import ResumePoint

__all__ = ["Hook", "LoopState", "Mask", "Progress", "Recording"]


@dataclass
class LoopState:
    """The live objects of one training run, as hooks see them.

    Attributes:
        config: The run.
        model: The model being trained (train mode).
        optimizer: Its optimizer (SGD).
        data: The dataset (after a task's ``prepare``).
        out: The store.
        group: The history group written.
        start_step: The step the run starts from (``init``'s step).
        resumed: The run continues from a resume point.
        step: The last completed update (`start_step`, or the resume point's step, before
            the first).
        last_eval: The latest test metrics.
    """

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: ImageData
    out: Path
    group: str
    start_step: int
    resumed: bool = False
    step: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)


class Hook:
    """Base class of training-loop hooks: override the points you need (all no-ops here)."""

    def on_start(self, state: LoopState) -> None:
        """Before the first update."""

    def before_update(self, state: LoopState, step: int) -> None:
        """After the backward pass of update `step`, before the optimizer steps."""

    def after_update(self, state: LoopState, step: int, loss: float) -> None:
        """After the optimizer stepped for update `step`."""

    def on_evaluation(self, state: LoopState, step: int, metrics: Mapping[str, float]) -> None:
        """At an evaluation step, with the test metrics."""

    def on_resume_point(self, state: LoopState, point: ResumePoint) -> None:
        """When a resume point has been captured."""

    def on_end(self, state: LoopState, completed: bool) -> None:
        """At the end of the loop (`completed` False: it stops because the loss diverged)."""


class Mask(Hook):
    """Keep pruned weights at exactly zero (a mask as a hook, not a branch in the loop).

    Zeroes them at the start and after every update, and zeroes their gradients before
    every update (so momentum never moves them).

    Args:
        mask: Per-parameter 0/1 arrays, by parameter name.
    """

    def __init__(self, mask: Mapping[str, np.ndarray]):
        self.mask = mask
        self._tensors: dict[str, torch.Tensor] = {}

    def _apply(self, model: nn.Module, *, grads: bool) -> None:
        named = dict(model.named_parameters())
        for name, m in self._tensors.items():
            p = named[name]
            if grads:
                if p.grad is not None:
                    p.grad.mul_(m)
            else:
                p.data.mul_(m)

    def on_start(self, state: LoopState) -> None:
        """Move the mask to the model's device and zero the pruned weights."""
        device = next(iter(state.model.parameters())).device
        self._tensors = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device)
                         for k, v in self.mask.items()}
        self._apply(state.model, grads=False)

    def before_update(self, state: LoopState, step: int) -> None:
        """Zero the pruned weights' gradients."""
        self._apply(state.model, grads=True)

    def after_update(self, state: LoopState, step: int, loss: float) -> None:
        """Zero the pruned weights again (weight decay and momentum moved them)."""
        self._apply(state.model, grads=False)


class Recording(Hook):
    """Record the run with a `Recorder`.

    The weights on its schedule, the loss, the example ids of each recorded update's batch
    (exact: batches are pure functions of the seed and the step, `batches.batch_indices`),
    the evaluations and the resume points; the history is marked complete at the end.

    Args:
        recorder: An open recorder of the loop's model and optimizer.
    """

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def on_start(self, state: LoopState) -> None:
        """Record the starting weights of a fresh run."""
        if not state.resumed:
            self.recorder.record(state.start_step)

    def after_update(self, state: LoopState, step: int, loss: float) -> None:
        """Record update `step` (a no-op off the schedule, except for the scalars)."""
        config = state.config
        per_epoch = batches.batches_per_epoch(state.data, config.batch_size)
        ids = None
        if step in self.recorder.schedule:
            ids = batches.batch_indices(state.data, step, batch_size=config.batch_size,
                                        seed=config.order_seed)
        self.recorder.record(step, loss=loss, epoch=step / per_epoch, batch=ids)

    def on_evaluation(self, state: LoopState, step: int, metrics: Mapping[str, float]) -> None:
        """Store the test metrics of `step`."""
        self.recorder.log_eval(step, **metrics)

    def on_resume_point(self, state: LoopState, point: ResumePoint) -> None:
        """Store the resume point."""
        self.recorder.save_resume_point(point)

    def on_end(self, state: LoopState, completed: bool) -> None:
        """Mark the history complete, or write out what is buffered before a failure."""
        if completed:
            self.recorder.mark_complete()
        else:
            self.recorder.flush()


class Progress(Hook):
    """Call ``fn(step, loss)`` after every update (progress bars)."""

    def __init__(self, fn: Callable[[int, float], None]):
        self.fn = fn

    def after_update(self, state: LoopState, step: int, loss: float) -> None:
        """Report update `step`."""
        self.fn(step, loss)
