"""The exact state of a training loop, captured and restored for bit-exact resumes.

The built-in loop's data order and learning rate are pure functions of the config and
the step; what else it carries from one update to the next is captured here: parameters
and buffers (BatchNorm statistics and ``num_batches_tracked`` included), the SGD momentum
buffers, torch's CPU generator (used by dropout-like layers) and the intra-op thread
count (CPU reductions split their work by thread, so the count changes the last bits).

`StopOnSignal` turns Ctrl-C (SIGINT) and SIGTERM into a request that the loop honours at
the next step boundary, after saving a resume point there.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ckpt_tools.store import ResumePoint, StoreError
from ckpt_tools.tensors import buffer_specs, param_specs, split_row

__all__ = ["StopOnSignal", "TrainingInterrupted", "capture", "restore"]


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
    """
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
