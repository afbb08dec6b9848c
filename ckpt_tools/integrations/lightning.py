"""Record a PyTorch Lightning run: ``Trainer(callbacks=[RecorderCallback(...)])``.

Step conventions (the same as `ckpt_tools.Recorder`, see ``docs/integrations.md``):

- step *s* holds the weights after *s* optimizer updates, with *s* =
  ``trainer.global_step``; step 0 (or the step a resumed fit starts from) is recorded
  at ``on_train_start``;
- a step is recorded at the end of the training batch whose optimizer update made it,
  so under ``accumulate_grad_batches=k`` it is recorded once per update, not per batch,
  and never twice;
- ``loss`` is the mean ``training_step`` loss over the batches of that update, ``lr``
  the first parameter group's learning rate as ``on_before_optimizer_step`` sees it
  (the one the update used), ``epoch`` the fractional epoch;
- ``grad_norm`` holds the norms of the gradients the update applied: Lightning calls
  ``on_before_optimizer_step`` before it clips, so they are read after the update,
  once clipping and unscaling are done;
- validation metrics (names starting with ``val``, or those named in
  ``eval_metrics``) are stored on ``eval_step`` at ``trainer.global_step``.

Under DDP only rank 0 writes, as with the `Recorder`; the sanity-check validation run
is not recorded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from ckpt_tools.recorder import Recorder
from ckpt_tools.schedule import Schedule

__all__ = ["RecorderCallback"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _final_step(trainer: pl.Trainer) -> int | None:
    """The last optimizer step of the fit, when the trainer knows it."""
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        return int(trainer.max_steps)
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if estimated != float("inf") else None


def _resolve(schedule: Schedule | str | Iterable[int], final: int | None) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        return Schedule.parse(schedule, final=final)
    return Schedule.from_steps(schedule)


class RecorderCallback(pl.Callback):
    """Record the weights of a Lightning fit at the steps of a schedule.

    Args:
        path: The store (``RUN.zarr``); created if missing.
        schedule: When to record: a `Schedule`, its text form or preset name (clipped to
            the fit's last step, which is then always recorded), or a list of steps.
        eval_schedule: Steps whose validation metrics are stored; default every step up
            to the last one, so each validation run lands on its own step.
        eval_metrics: Names of the validation metrics to store; default every logged
            metric whose name starts with ``val``. Characters other than letters,
            digits, ``_``, ``.`` and ``-`` become ``_`` in the store (``val/acc`` is
            stored as ``val_acc``).
        **recorder_options: Passed on to `ckpt_tools.Recorder` (``group``, ``config``,
            ``overwrite``, ``resume``, ``optimizer_state``, ...). ``config`` defaults to
            the module's hyperparameters and the trainer's step settings, ``optimizer``
            to the trainer's optimizer when it has one.

    Attributes:
        recorder: The `Recorder` of the running fit (None before ``on_train_start``).
    """

    def __init__(
        self,
        path: str | Path,
        schedule: Schedule | str | Iterable[int],
        *,
        eval_schedule: Schedule | str | Iterable[int] | None = None,
        eval_metrics: Sequence[str] | None = None,
        **recorder_options: Any,
    ):
        super().__init__()
        self.path, self.schedule = Path(path), schedule
        self.eval_schedule = eval_schedule
        self.eval_metrics = tuple(eval_metrics) if eval_metrics is not None else None
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None
        self._last = -1
        self._losses: list[float] = []
        self._lr: float | None = None

    # -- set-up and tear-down -----------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the recorder on the module being trained and record the starting step."""
        if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy):
            # Their parameters are flat shards the Recorder cannot map to tensors.
            raise ValueError(
                f"RecorderCallback cannot record under {type(trainer.strategy).__name__}; "
                "use strategy='ddp' or ModelParallelStrategy (FSDP2, fully_shard)"
            )
        final = _final_step(trainer)
        schedule = _resolve(self.schedule, final)
        evals = self.eval_schedule
        if evals is None:
            evals = Schedule.parse(f"0:{final + 1}:1", final=final) if final else schedule
        options = dict(self.recorder_options)
        options.setdefault("config", self._config(trainer, pl_module))
        if len(trainer.optimizers) == 1:  # its state can be recorded (optimizer_state=True)
            options.setdefault("optimizer", trainer.optimizers[0])
        self.recorder = Recorder(
            self.path, pl_module, schedule, eval_schedule=_resolve(evals, final), **options
        )
        self._last, self._losses = -1, []
        self._record(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Mark the history complete and close the recorder (waits for the writer)."""
        if self.recorder is not None:
            self.recorder.mark_complete()
            self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Keep what was recorded up to the failure: flush it and close the recorder."""
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close a recorder left open (the fit stopped before ``on_train_end``)."""
        self._close()

    def _close(self) -> None:
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            recorder.close()

    @staticmethod
    def _config(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        return {
            "framework": "lightning",
            "module": type(pl_module).__name__,
            "hparams": dict(pl_module.hparams),
            "max_steps": trainer.max_steps,
            "max_epochs": trainer.max_epochs,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient_clip_val": trainer.gradient_clip_val,
            "world_size": trainer.world_size,
        }

    # -- training -----------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Note the learning rate this update uses (schedulers step after it)."""
        self._lr = float(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        """Collect the batch's loss; record once the batch completed an optimizer update."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            value = float(loss)
            if pl_module.automatic_optimization:
                # Lightning divides the returned loss by the accumulation factor.
                value *= trainer.accumulate_grad_batches
            self._losses.append(value)
        if trainer.global_step > self._last:
            scalars = {}
            batches = trainer.num_training_batches
            if 0 < batches < float("inf"):
                scalars["epoch"] = trainer.current_epoch + (batch_idx + 1) / batches
            if self._losses:
                scalars["loss"] = sum(self._losses) / len(self._losses)
            if self._lr is not None:
                scalars["lr"] = self._lr
            self._record(trainer.global_step, **scalars)
            self._losses = []

    def _record(self, step: int, **scalars: float) -> None:
        if self.recorder is not None and step > self._last:
            self.recorder.record(step, **scalars)
            self._last = step

    # -- validation ---------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Store this validation run's metrics at the current step."""
        if self.recorder is None or trainer.sanity_checking:
            return
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            wanted = (name in self.eval_metrics if self.eval_metrics is not None
                      else name.startswith("val"))
            if wanted and (not isinstance(value, torch.Tensor) or value.numel() == 1):
                metrics[_UNSAFE.sub("_", name)] = float(value)
        if metrics:
            self.recorder.log_eval(trainer.global_step, **metrics)
