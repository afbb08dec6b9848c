"""Experiment sizes, all in one place: `--preset smoke` (CI, seconds) and `--preset study`.

Each preset names the dense run it is sized for (record it with the `ckpt record` line in
``docs/experiments.md``) and the settings of the experiments run from it. Options given
on the command line override a preset's values.

Sizing of ``study`` (ResNet-20 on Fashion-MNIST, 28x28, batch 128, 2 CPU cores, torch's
default 2 threads): one training step took 0.23-0.26 s and one evaluation of the 10,000
test images about 25 s in the batches of 1,000 then used (4.2 s in today's batches of
128, so the sums below are upper bounds) with the cores lightly shared (load ~2.5); with the cores
oversubscribed (load ~9) the same step took 2-4 s, so these sizes assume a quiet machine
(commands in ``docs/experiments.md``, "Sizes"). The dense run is 800 steps (1.7 epochs,
~7 min with its 9 evaluations). IMP: 2 rewind steps x 2 seeds x 4 levels = 16
retrainings of 800 - k steps, (800 + 700) x 2 x 4 = 12,000 steps x 0.25 s = 50 min, plus
24 evaluations (the final one of each level, and step 0 when k = 0) x 25 s = 10 min:
about an hour. Each level prunes 40% rather than the paper's 20%, so that four levels
reach 13% of the weights (20% would need nine). Instability: 4 rewind steps x 2 copies,
(800 + 775 + 700 + 400) x 2 = 5,350 steps = 22 min, 10 evaluations = 4 min, and 9 points
x 4 steps x 26 s (evaluation and BatchNorm re-estimation) = 16 min: about 42 min.
Ablations: one ablated run from k = 100 is 700 updates and 2 evaluations, about 4 minutes,
so one panel (5 to 6 kinds x 2 IMP seeds) takes about 40 minutes. Pre-training: one dense
task is 100 pre-training updates and 3 real-task runs of 700 updates (levels 0-2, 36% of
the weights left at level 2, as IMP level 2), about 13 minutes; ``sparse`` (IMP mask of
level 2, rewind 0) about 5 minutes; so the five tasks and ``sparse`` take about an hour
and a quarter.

Pruning of the output layer follows the model family (ResNet-20 prunes it, as open_lth).
The ablation and pre-training sizes are partial settings (the command line gives the
rewind step and kinds, or the task); each experiment checks them against its settings'
fields (`ckpt_tools.analyses.experiments.contract.Experiment.preset_values`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ckpt_tools.analyses.experiments.imp import ImpSettings
from ckpt_tools.analyses.experiments.instability import InstabilitySettings
from ckpt_tools.train import TrainConfig

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A named size for the experiments.

    Attributes:
        name: The `--preset` value.
        description: One line on what it is for.
        record: The dense run the sizes assume (``ckpt record`` with these values).
        imp: The IMP experiment (``ckpt imp``).
        instability: The instability experiment (``ckpt instability``).
        ablate: `AblationSettings` values (``ckpt ablate``; with ``--rewind`` and ``--kind``).
        pretrain: `PretrainSettings` values (``ckpt pretrain``; with ``--task``).
    """

    name: str
    description: str
    record: TrainConfig
    imp: ImpSettings
    instability: InstabilitySettings
    ablate: Mapping[str, object]
    pretrain: Mapping[str, object]


_TINY = TrainConfig(
    model="convnet", dataset="digits", width=8, steps=40, batch_size=64,
    schedule="0:20:1,20:41:5", eval_schedule="0:41:20", seed=0,
)
_STUDY = TrainConfig(
    model="resnet20", dataset="fashion-mnist", steps=800, batch_size=128,
    schedule="0:100:1,100:400:5,400:801:20", eval_schedule="0:801:100", seed=0,
)

PRESETS = MappingProxyType({
    "smoke": Preset(
        name="smoke",
        description="CI size: seconds on the tiny digits run of the tests",
        record=_TINY,
        imp=ImpSettings(levels=2, rewind_steps=(0, 5), seeds=(0, 1), schedule="0:41:10"),
        instability=InstabilitySettings(
            rewind_steps=(0, 5), seeds=(1, 2), points=5, bn_batches=2, schedule="0:41:10",
        ),
        ablate=MappingProxyType({"schedule": "0:41:10", "alphas": (0.5, 2.0)}),
        pretrain=MappingProxyType({"steps": 5, "levels": 1, "schedule": "0:41:10"}),
    ),
    "study": Preset(
        name="study",
        description="ResNet-20 on Fashion-MNIST, about an hour of IMP on 2 CPU cores",
        record=_STUDY,
        imp=ImpSettings(
            levels=4, rewind_steps=(0, 100), seeds=(0, 1), fraction=0.4, scope="global",
            eval_schedule="800",
        ),
        instability=InstabilitySettings(
            rewind_steps=(0, 25, 100, 400), seeds=(1, 2), points=9, bn_batches=10,
            eval_schedule="800",
        ),
        ablate=MappingProxyType({"eval_schedule": "400", "alphas": (0.5, 1.0, 2.0)}),
        pretrain=MappingProxyType({
            "steps": 100, "levels": 2, "seeds": (0,), "fraction": 0.4, "eval_schedule": "400",
        }),
    ),
})
"""Presets by name."""


def get_preset(name: str) -> Preset:
    """The preset called `name`.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
