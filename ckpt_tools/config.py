"""The configuration of a built-in training run: a frozen dataclass stored with the run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ckpt_tools.schedule import Schedule

__all__ = ["TrainConfig"]


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
    augment: bool | None = None  # random crop + flip; None: the dataset's default (CIFAR, SVHN)
    resolution: int | None = None  # image side in pixels (area-averaged down); None: native
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
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be at least 1 pixel, got {self.resolution}")
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
