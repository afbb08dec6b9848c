"""The built-in training loop: SGD with step decay, recorded by a `Recorder`.

`train` runs the optimisation and calls hooks at fixed points (`ckpt_tools.hooks`):
recording, masks and progress are hooks; pretext tasks are a `Task`; resume points and
signals are `ckpt_tools.resume.ResumePoints`.

Every source of randomness is a pure function of the configuration: the model is built
right after `torch.manual_seed(config.seed)`, and the batch of update `s` is drawn by
`batch_for_step(data, s, seed=config.data_seed)`. So a run can be rewound to any stored
step k and continued with the learning rate and data order it would have seen (IMP with
rewinding), and resumed exactly after a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ckpt_tools import batches, models
from ckpt_tools import data as datasets
from ckpt_tools.config import TrainConfig
from ckpt_tools.hooks import Hook, LoopState, Mask, Progress, Recording
from ckpt_tools.recorder import Recorder
from ckpt_tools.resume import ResumePoints, capture, match_threads, restore
from ckpt_tools.schedule import Schedule
from ckpt_tools.store import Location, as_location, check_state_dict, read_resume_point

__all__ = [
    "Hook",
    "Task",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build",
    "evaluate",
    "lr_at",
    "train",
    "with_overrides",
]


@dataclass(frozen=True)
class Task:
    """Another objective for the same model and data (pre-training on a pretext task).

    Attributes:
        prepare: Applied once to the loaded dataset, before the model is built: e.g.
            random labels, a subset of the training split, or another ``num_classes``
            (the size of the model's head).
        transform: Applied to every normalised batch as ``transform(x, y, step) -> (x, y)``;
            ``step`` is the update (1-based) for training batches and 0 for evaluation.
    """

    prepare: Callable[[datasets.ImageData], datasets.ImageData] | None = None
    transform: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, ...]] | None = None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; what was recorded before stays in the store."""


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate used by optimizer update number `step` (1-based)."""
    lr = config.lr * config.lr_gamma ** sum(step > m * config.steps for m in config.lr_milestones)
    if config.warmup_steps and step <= config.warmup_steps:
        lr *= step / config.warmup_steps
    return lr


def build(
    config: TrainConfig, *, task: Task | None = None
) -> tuple[nn.Module, datasets.ImageData]:
    """Load the dataset (``task.prepare``d) and build the model, initialised from `config.seed`."""
    data = datasets.load(config.dataset, root=config.data_root, augment=config.augment,
                         resolution=config.resolution)
    if task is not None and task.prepare is not None:
        data = task.prepare(data)
    torch.manual_seed(config.seed)
    model = models.build(
        config.model, num_classes=data.num_classes, in_channels=data.in_channels,
        image_size=data.image_size, width=config.width,
    )
    return model.to(config.device), data


@torch.no_grad()
def evaluate(
    model: nn.Module, data: datasets.ImageData, *, batch_size: int = 128, device="cpu",
    transform: Callable | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over the whole test split (eval mode).

    `transform` (a `Task.transform`) is applied to every test batch with ``step`` 0.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for x, y in batches.test_batches(data, batch_size, device=device):
        if transform is not None:
            x, y = transform(x, y, 0)
        logits = model(x)
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return {"test_loss": total_loss / n, "test_accuracy": correct / n}


@dataclass
class TrainResult:
    """What a finished `train` call reports."""

    out: Path | Location  # a local store's path, or the location of one elsewhere
    group: str
    last_step: int
    final_eval: dict[str, float] = field(default_factory=dict)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    group: str = "train",
    overwrite: bool = False,
    init: Mapping[str, torch.Tensor] | None = None,
    start_step: int = 0,
    mask: Mapping[str, np.ndarray] | None = None,
    schedule: Schedule | None = None,
    extra_attrs: Mapping | None = None,
    on_step: Callable[[int, float], None] | None = None,
    task: Task | None = None,
    resume: bool = False,
    resume_interval: float | None = 30.0,
    codec: str = "lz4",
    hooks: Sequence[Hook] = (),
    recorder_options: Mapping | None = None,
) -> TrainResult:
    """Train `config` and record it into the group `group` of the store `out`.

    Args:
        config: The run.
        out: The store path.
        group: History group to write.
        overwrite: Replace an existing group.
        init: A `state_dict` to start from (e.g. the stored weights at step k).
        start_step: The step `init` belongs to; training continues from it with the
            learning rate and data order of an uninterrupted run, and a fresh optimizer.
        mask: Per-parameter 0/1 arrays; masked weights are zero and stay exactly zero
            (shorthand for the hook ``Mask(mask)``, which runs first).
        schedule: Checkpoint schedule (default: `config.checkpoint_schedule()`).
        extra_attrs: Extra JSON-able attributes stored with the group (e.g. IMP level).
        on_step: Called as `on_step(step, loss)` after each update (shorthand for the
            hook ``Progress(on_step)``, which runs last).
        task: Train on another objective (see `Task`); evaluation uses it too.
        resume: Continue the existing group `group` from its latest resume point (from
            its start if it has none), bit for bit as if never interrupted. Pass the same
            arguments as the interrupted call.
        resume_interval: Seconds between resume points (0: after every update; None:
            none, except when stopped by a signal).
        codec: How the recorded chunks are stored (``"lz4"`` or ``"none"``; see
            `Recorder`).
        hooks: More hooks (`ckpt_tools.hooks.Hook`), called in order after the mask's
            and before the recording's (what they change in the model is recorded).
        recorder_options: More keyword arguments of `Recorder` (`host_memory`,
            `writers`, `include`, `exclude`).

    Ctrl-C (SIGINT) or SIGTERM stops the loop at the next step boundary, with a resume
    point there.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (the store keeps what was
            recorded up to then).
        TrainingInterrupted: stopped by SIGINT/SIGTERM (resume with ``resume=True``).
        StoreError: `init` does not fit the model, or the group to resume was recorded
            with another configuration or architecture.
    """
    device = torch.device(config.device)
    if resume:
        match_threads(out, group)
    model, data = build(config, task=task)
    if init is not None:
        check_state_dict(init, model)
        model.load_state_dict(init)
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=lr_at(config, start_step + 1), momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    evals = config.evaluation_schedule()
    attrs = {**config.to_dict(), **dict(extra_attrs or {}), "start_step": start_step}
    where = as_location(out)
    out = where.path if where.is_local else where  # a local store keeps its Path
    state = LoopState(config, model, opt, data, out, group, start_step, step=start_step)
    with ResumePoints(resume_interval) as points, Recorder(
        out, model, schedule or config.checkpoint_schedule(), group=group, config=attrs,
        optimizer=opt, eval_schedule=evals, overwrite=overwrite, resume=resume, codec=codec,
        **dict(recorder_options or {}),
    ) as rec:
        # Hooks that change the model run before the recording, so it stores their effect.
        run_hooks = [*([Mask(mask)] if mask is not None else []), *hooks, Recording(rec),
                     *([Progress(on_step)] if on_step is not None else [])]
        point = read_resume_point(out, group) if resume else None
        if point is not None:
            restore(point, model, opt)
            state.resumed, state.step = True, point.step
            state.last_eval = dict(point.info.get("last_eval") or {})
        for hook in run_hooks:
            hook.on_start(state)
        if point is None and start_step in evals:
            metrics = _evaluate(state, task, device)
            for hook in run_hooks:
                hook.on_evaluation(state, start_step, metrics)
        _loop(state, run_hooks, points, evals, task=task, device=device)
    return TrainResult(out, group, state.step, state.last_eval)


def _evaluate(state: LoopState, task: Task | None, device) -> dict[str, float]:
    return evaluate(state.model, state.data, batch_size=state.config.eval_batch_size,
                    device=device, transform=task.transform if task is not None else None)


def _loop(state: LoopState, hooks: Sequence[Hook], points: ResumePoints, evals: Schedule, *,
          task: Task | None, device) -> None:
    """Updates ``state.step + 1 .. config.steps``, calling `hooks` at their points."""
    config, model, opt = state.config, state.model, state.optimizer
    for step in range(state.step + 1, config.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(config, step)
        x, y = batches.batch_for_step(
            state.data, step, batch_size=config.batch_size, seed=config.order_seed, device=device
        )
        if task is not None and task.transform is not None:
            x, y = task.transform(x, y, step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        for hook in hooks:
            hook.before_update(state, step)
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            for hook in hooks:
                hook.on_end(state, False)
            raise TrainingDiverged(
                f"loss became {value} at step {step}; steps up to "
                f"{state.step} are stored in {state.out} (group '{state.group}'); "
                "lower --lr and record again"
            )
        for hook in hooks:
            hook.after_update(state, step, value)
        state.step = step
        if step in evals:
            state.last_eval = _evaluate(state, task, device)
            for hook in hooks:
                hook.on_evaluation(state, step, state.last_eval)
        if step < config.steps and points.due():
            point = capture(step, model, opt, info={"last_eval": state.last_eval})
            for hook in hooks:
                hook.on_resume_point(state, point)
            points.saved()
            if points.stopping:
                raise points.interrupted(step, state.out, state.group)
    for hook in hooks:
        hook.on_end(state, True)


def with_overrides(config: TrainConfig, **values) -> TrainConfig:
    """A copy of `config` with the non-None `values` replaced."""
    return replace(config, **{k: v for k, v in values.items() if v is not None})
