"""Record a Hugging Face `Trainer` run: ``trainer.add_callback(RecorderCallback(...))``.

Step conventions (the same as `ckpt_tools.Recorder`, see ``docs/integrations.md``):

- step *s* holds the weights after *s* optimizer updates, *s* = ``state.global_step``;
  step 0 (or the step a resumed run starts from) is recorded at ``on_train_begin``;
- weights are read at ``on_step_end``, which the Trainer calls once per optimizer update
  (after ``gradient_accumulation_steps`` batches), and a step is never recorded twice;
- ``grad_norm`` holds the norms of the gradients the update applied, read at
  ``on_pre_optimizer_step`` (after clipping; the Trainer clears the gradients before
  ``on_step_end``); ``lr`` is the learning rate that update used, ``epoch`` the
  Trainer's fractional epoch;
- evaluation metrics (``eval_*``, without the timing ones) are stored on ``eval_step`` at
  ``state.global_step``.

The Trainer does not show callbacks the loss of each update (it logs averages over
``logging_steps``), so no per-step ``loss`` is stored. Under DDP only rank 0 writes, as
with the `Recorder`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ckpt_tools.recorder import Recorder
from ckpt_tools.schedule import Schedule

__all__ = ["RecorderCallback"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_TIMING = ("_runtime", "_per_second")


def _resolve(schedule: Schedule | str | Iterable[int], final: int | None) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        return Schedule.parse(schedule, final=final)
    return Schedule.from_steps(schedule)


def _grad_norms(model: nn.Module) -> list[float]:
    """L2 norm of each parameter's gradient, in `named_parameters` order (NaN: none)."""
    grads = [p.grad for _, p in model.named_parameters()]
    present = [g for g in grads if g is not None]
    norms = iter(torch.stack(torch._foreach_norm(present)).float().cpu().tolist()
                 if present else [])
    return [next(norms) if g is not None else float("nan") for g in grads]


class RecorderCallback(transformers.TrainerCallback):
    """Record the weights of a `transformers.Trainer` run at the steps of a schedule.

    Args:
        path: The store (``RUN.zarr``); created if missing.
        schedule: When to record: a `Schedule`, its text form or preset name (clipped to
            ``state.max_steps``, which is then always recorded), or a list of steps.
        eval_schedule: Steps whose evaluation metrics are stored; default every step up
            to the last one, so each evaluation lands on its own step.
        **recorder_options: Passed on to `ckpt_tools.Recorder` (``group``, ``config``,
            ``overwrite``, ``resume``, ``optimizer_state``, ...). ``config`` defaults to
            the training arguments and the model's configuration, ``optimizer`` to the
            Trainer's (unwrapped from accelerate's wrapper).

    Attributes:
        recorder: The `Recorder` of the running training (None before it starts).
    """

    def __init__(
        self,
        path: str | Path,
        schedule: Schedule | str | Iterable[int],
        *,
        eval_schedule: Schedule | str | Iterable[int] | None = None,
        **recorder_options: Any,
    ):
        self.path, self.schedule = Path(path), schedule
        self.eval_schedule = eval_schedule
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None
        self._last = -1
        self._pending: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Open the recorder on the model and record the starting step."""
        final = state.max_steps if state.max_steps and state.max_steps > 0 else None
        schedule = _resolve(self.schedule, final)
        evals = self.eval_schedule
        if evals is None:
            evals = f"0:{final + 1}:1" if final else schedule
        options = dict(self.recorder_options)
        options.setdefault("config", {
            "framework": "transformers",
            "training_args": args.to_dict(),
            "model_config": model.config.to_dict() if hasattr(model, "config") else None,
            "seed": args.seed,
        })
        if optimizer is not None:  # its state can be recorded (optimizer_state=True)
            options.setdefault("optimizer", getattr(optimizer, "optimizer", optimizer))
        self.recorder = Recorder(
            self.path, model, schedule, eval_schedule=_resolve(evals, final), **options
        )
        self._last, self._pending = -1, {}
        self._record(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Take the gradient norms and learning rate of the coming update, if recorded."""
        if self.recorder is None or state.global_step + 1 not in self.recorder.schedule:
            return
        self._pending = {"grad_norm": _grad_norms(model)}
        if optimizer is not None:
            self._pending["lr"] = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        """Record the weights after the update that made `state.global_step`."""
        pending, self._pending = self._pending, {}
        if state.epoch is not None:
            pending["epoch"] = float(state.epoch)
        self._record(state.global_step, **pending)

    def on_evaluate(self, args, state, control, metrics: Mapping | None = None, **kwargs):
        """Store the evaluation's metrics at the current step."""
        if self.recorder is None or not metrics:
            return
        values = {_UNSAFE.sub("_", k): float(v) for k, v in metrics.items()
                  if k.startswith("eval_") and not k.endswith(_TIMING)
                  and isinstance(v, int | float)}
        if values:
            self.recorder.log_eval(state.global_step, **values)

    def on_train_end(self, args, state, control, **kwargs):
        """Mark the history complete and close the recorder (waits for the writer)."""
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            try:
                recorder.mark_complete()
            finally:
                recorder.close()

    def _record(self, step: int, **values: Any) -> None:
        if self.recorder is not None and step > self._last:
            self.recorder.record(step, **values)
            self._last = step
