"""The built-in training loop: SGD with step decay, recorded by a `Recorder`.

Every source of randomness is a pure function of the configuration: the model is built
right after `torch.manual_seed(config.seed)`, and the batch of update `s` is drawn by
`batch_for_step(data, s, seed=config.data_seed)`. So a run can be rewound to any stored
step k and continued with the learning rate and data order it would have seen (IMP with
rewinding), and resumed exactly after a crash.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ckpt_tools import batches, models
from ckpt_tools import data as datasets
from ckpt_tools.recorder import Recorder
from ckpt_tools.schedule import Schedule
from ckpt_tools.store import check_state_dict, read_group_meta, read_resume_point
from ckpt_tools.train_state import StopOnSignal, capture, restore

__all__ = [
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
class TrainConfig:
    """Everything that determines a training run (stored in the store's attributes).

    The defaults follow the paper's ResNet-20 recipe (SGD, momentum 0.9, lr 0.1 dropped
    10x at 50% and 75% of training, weight decay 1e-4, batch 128), scaled down to the
    embedded digits dataset.
    """

    model: str = "resnet20"
    dataset: str = "digits"
    data_root: str | None = None
    width: int | None = None  # model width (channels of the first stage); None: default
    steps: int = 1000  # optimizer updates
    batch_size: int = 128  # examples per update
    lr: float = 0.1  # peak learning rate (no scaling with batch size)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of `steps` where lr drops
    lr_gamma: float = 0.1  # factor applied at each milestone
    warmup_steps: int = 0  # linear warm-up from 0 over these many updates
    seed: int = 0  # model initialisation
    data_seed: int | None = None  # data order and augmentation; None: same as `seed`
    schedule: str = "dense-early"  # checkpoint schedule (text form or preset)
    eval_schedule: str | None = None  # None: 20 evenly spaced evaluations and the last
    eval_batch_size: int = 128  # examples per evaluation batch (128 is fastest on CPU)
    device: str = "cpu"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))

    @property
    def order_seed(self) -> int:
        """The seed of the data order and augmentation."""
        return self.seed if self.data_seed is None else self.data_seed

    def checkpoint_schedule(self) -> Schedule:
        """The checkpoint schedule, clipped to `steps` and holding 0 and `steps`."""
        return Schedule.parse(self.schedule, final=self.steps)

    def evaluation_schedule(self) -> Schedule:
        """The evaluation schedule, clipped to `steps` and holding 0 and `steps`."""
        text = self.eval_schedule or f"0:{self.steps}:{max(1, self.steps // 20)}"
        return Schedule.parse(text, final=self.steps)

    def to_dict(self) -> dict:
        """JSON-ready form (stored as the run's config)."""
        return {**asdict(self), "lr_milestones": list(self.lr_milestones)}

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


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
    data = datasets.load(config.dataset, root=config.data_root)
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

    out: Path
    group: str
    last_step: int
    final_eval: dict[str, float] = field(default_factory=dict)


def _apply_mask(model: nn.Module, mask: Mapping[str, torch.Tensor], *, grads: bool) -> None:
    named = dict(model.named_parameters())
    for name, m in mask.items():
        p = named[name]
        if grads:
            if p.grad is not None:
                p.grad.mul_(m)
        else:
            p.data.mul_(m)


def _same_threads(meta: Mapping) -> None:
    # CPU reductions split their work by thread: the count changes the last bits.
    threads = meta.get("torch_threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


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
        mask: Per-parameter 0/1 arrays; masked weights are zero and stay exactly zero.
        schedule: Checkpoint schedule (default: `config.checkpoint_schedule()`).
        extra_attrs: Extra JSON-able attributes stored with the group (e.g. IMP level).
        on_step: Called as `on_step(step, loss)` after each update (progress bars).
        task: Train on another objective (see `Task`); evaluation uses it too.
        resume: Continue the existing group `group` from its latest resume point (from
            its start if it has none), bit for bit as if never interrupted. Pass the same
            arguments as the interrupted call.
        resume_interval: Seconds between resume points (0: after every update; None:
            none, except when stopped by a signal).
        codec: How the recorded chunks are stored (``"lz4"`` or ``"none"``; see
            `Recorder`).

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
        _same_threads(read_group_meta(out, group))
    model, data = build(config, task=task)
    transform = task.transform if task is not None else None
    if init is not None:
        check_state_dict(init, model)
        model.load_state_dict(init)
    masks = None
    if mask is not None:
        masks = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device)
                 for k, v in mask.items()}
        _apply_mask(model, masks, grads=False)
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=lr_at(config, start_step + 1), momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    sched = schedule or config.checkpoint_schedule()
    evals = config.evaluation_schedule()
    attrs = {**config.to_dict(), **dict(extra_attrs or {}), "start_step": start_step}
    result = TrainResult(Path(out), group, start_step)
    with StopOnSignal() as stop, Recorder(
        out, model, sched, group=group, config=attrs, optimizer=opt,
        eval_schedule=evals, overwrite=overwrite, resume=resume, codec=codec,
    ) as rec:
        point = read_resume_point(out, group) if resume else None
        if point is None:
            rec.record(start_step)
            if start_step in evals:
                rec.log_eval(start_step, **evaluate(
                    model, data, batch_size=config.eval_batch_size, device=device,
                    transform=transform))
        else:
            restore(point, model, opt)
            result.last_step = point.step
            result.final_eval = dict(point.info.get("last_eval") or {})
        next_point = time.monotonic() + (resume_interval or 0.0)
        for step in range(result.last_step + 1, config.steps + 1):
            for g in opt.param_groups:
                g["lr"] = lr_at(config, step)
            x, y = batches.batch_for_step(
                data, step, batch_size=config.batch_size, seed=config.order_seed, device=device
            )
            if transform is not None:
                x, y = transform(x, y, step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if masks is not None:
                _apply_mask(model, masks, grads=True)
            opt.step()
            if masks is not None:
                _apply_mask(model, masks, grads=False)
            value = loss.item()
            if not math.isfinite(value):
                rec.flush()
                raise TrainingDiverged(
                    f"loss became {value} at step {step}; steps up to "
                    f"{result.last_step} are stored in {out} (group '{group}'); "
                    "lower --lr and record again"
                )
            rec.record(step, loss=value, epoch=step / batches.batches_per_epoch(
                data, config.batch_size))
            result.last_step = step
            if step in evals:
                metrics = evaluate(model, data, batch_size=config.eval_batch_size, device=device,
                                   transform=transform)
                rec.log_eval(step, **metrics)
                result.final_eval = metrics
            if on_step is not None:
                on_step(step, value)
            due = resume_interval is not None and time.monotonic() >= next_point
            if step < config.steps and (due or stop.signum is not None):
                rec.save_resume_point(capture(step, model, opt,
                                              info={"last_eval": result.final_eval}))
                next_point = time.monotonic() + (resume_interval or 0.0)
                if stop.signum is not None:
                    raise stop.interrupted(step, out, group)
        rec.mark_complete()
    return result


def with_overrides(config: TrainConfig, **values) -> TrainConfig:
    """A copy of `config` with the non-None `values` replaced."""
    return replace(config, **{k: v for k, v in values.items() if v is not None})
