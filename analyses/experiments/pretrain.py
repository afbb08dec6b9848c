"""Pre-training before IMP (the paper's Section 5), trained from a store and recorded in it.

Can another task, or the sparse network alone, do the work of the dense network's early
phase? With the recorded run's config (T updates) and for each data seed s:

Dense pretext tasks (``rotation``, ``blur``, ``blur-rotation``, ``random-labels``,
``subset``; see `ckpt_tools.analyses.experiments.pretext`):

1. Pre-training: the stored weights at step 0 (rotation tasks: with a fresh 4-way head,
   drawn as the model's own initialisation from ``config.seed``) are trained for N updates
   on the pretext task; update ``i`` uses the learning rate of update ``i`` of the real run
   and the data order of seed s; fresh SGD. Recorded as ``.../pretrain``.
2. IMP rewinding to the pre-trained weights: the pre-trained network (parameters and
   BatchNorm buffers; rotation tasks: the head replaced by the run's stored step-0 head)
   is the starting point of the real task. Level 0 trains it dense; level n prunes
   `fraction` of level n-1's survivors by the magnitude of its final weights and
   rewinds to the pre-trained weights. How long the real task runs (`real_task`):

   - ``from-n`` (default, as open_lth): the pre-trained weights stand at step N of the
     real run, which trains updates N+1..T (T - N updates; learning rate and data order
     of those updates, fresh optimizer), so pre-training plus the real task add up to
     the T updates a rewound IMP run has. Recorded as ``.../from_n/level_<n>``, masks
     in ``.../from_n/masks``.
   - ``full``: the pre-trained weights play the role of iteration 0 and the real task
     trains all T updates, learning rate and data order from update 1 (N + T updates
     in all). Recorded as ``.../level_<n>``, masks in ``.../masks`` (where stores of
     earlier versions, which had only this mode, hold them).

Sparse pre-training (``sparse``): the mask is level L of the IMP lineage (rewind K, seed
s) of ``ckpt imp``; the masked network at step 0 is pre-trained on the real task for N
updates (``.../pretrain``), then trained with the same mask from the pre-trained weights
as above (``.../from_n/level_<L>`` or ``.../level_<L>``).

Groups live under ``experiments/pretrain/<condition>/steps_<N>/seed_<s>/`` (`condition`:
the task with its parameter); the pre-training run ``pretrain`` is the same in both
modes and shared. The result ``analyses/pretrain_summary`` gathers them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import xarray as xr

from ckpt_tools import load_state_dict
from ckpt_tools.analyses.experiments import pretext
from ckpt_tools.analyses.experiments.contract import (
    Experiment,
    Progress,
    SummaryTable,
    parse_seeds,
    setting,
)
from ckpt_tools.analyses.experiments.lineage import Pruning, run_lineage
from ckpt_tools.analyses.experiments.pruning import (
    Scope,
    dense_config,
    history_complete,
    mask_group,
    param_table,
    pruning_exclusions,
    read_mask,
    remaining_fraction,
    train_sparse,
)
from ckpt_tools.store import (
    StoreError,
    history_groups,
    last_evaluations,
    read_group_meta,
    read_result,
    write_result,
)
from ckpt_tools.train import TrainConfig, build

__all__ = [
    "EXPERIMENT",
    "SUMMARY",
    "TASKS",
    "PretrainSettings",
    "condition_label",
    "pretrain_config",
    "pretrain_group",
    "pretrain_summary",
    "read_pretrain_summary",
    "run_pretrain",
]

TASKS = (*pretext.PRETEXT_TASKS, "sparse")
SUMMARY = "pretrain_summary"  # result name: the summary lives at analyses/pretrain_summary
FULL_SUFFIX = "_full"  # summary label of a condition whose real task trained all T updates

RealTask = Literal["from-n", "full"]

_GROUP_RE = re.compile(
    r"^experiments/pretrain/(.+)/steps_(\d+)/seed_(\d+)/(?:(from_n)/)?(pretrain|level_(\d+))$")


@dataclass(frozen=True)
class PretrainSettings:
    """One pre-training experiment.

    Attributes:
        task: One of `TASKS`.
        steps: Pre-training updates N (>= 1).
        seeds: Data seeds (pre-training order, retraining order, the task's draws);
            None: the dense run's order seed.
        levels: IMP levels after pre-training (dense tasks), or the level of the IMP
            mask that ``sparse`` pre-trains.
        rewind: ``sparse`` only: the IMP lineage (rewind step) whose mask is used.
        blur_factor: Block size of the blur tasks.
        subset_fraction: Fraction of the training split that ``subset`` keeps.
        fraction: Fraction of the survivors pruned per IMP level (dense tasks).
        scope: ``"global"`` or ``"layer"`` magnitude pruning (dense tasks).
        exclude_output: Dense tasks: True leaves the output layer unpruned, False prunes
            it, None follows the model family (`pruning.output_excluded`, as ``ckpt imp``).
        real_task: ``"from-n"``: the real task trains updates N+1..T (open_lth's
            pre-training); ``"full"``: all T updates after pre-training.
        schedule: Checkpoint schedule of the real-task runs; None: 21 evenly spaced.
        eval_schedule: Test evaluations of every run (clipped to its length); None:
            the dense run's.
    """

    task: str = setting(
        choices=TASKS, help="Pre-training task; sparse: the IMP sub-network on the real task.")
    steps: int = setting(help="Pre-training updates.")
    seeds: tuple[int, ...] | None = setting(
        None, parse=parse_seeds, help="Data seeds, comma-separated (default: the dense run's).")
    levels: int = setting(
        1, help="IMP levels after pre-training; for sparse, the level of the IMP mask "
        "(default 1).")
    rewind: int = setting(
        0, help="sparse: the IMP lineage (rewind step) whose mask is pre-trained (default 0).")
    blur_factor: int = setting(
        4, help="Block size of blur and blur-rotation, in pixels (default 4).")
    subset_fraction: float = setting(
        0.1, help="Fraction of the training split kept by subset (default 0.1).")
    fraction: float = setting(
        0.2, help="Fraction of the surviving weights pruned per level (default 0.2).")
    scope: Scope = setting(
        "global", help="global: one threshold across layers; layer: the same fraction per layer.")
    exclude_output: bool | None = setting(
        None, flag="--exclude-output/--include-output",
        help="Leave the output layer unpruned, or prune it (default: the model family's, "
        "as open_lth: ResNets and convnet prune it, VGG and LeNet do not).")
    real_task: RealTask = setting(
        "from-n", help="from-n: the real task trains updates N+1..T, so pre-training and "
        "real task add up to T (as open_lth; default); full: all T updates after "
        "pre-training.")
    schedule: str | None = setting(
        None, help="Checkpoint schedule of each run (default: 21 evenly spaced steps).")
    eval_schedule: str | None = setting(
        None, help="Test evaluations of each run (default: the dense run's).")

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.steps < 1:
            raise ValueError(f"pre-training steps must be >= 1, got {self.steps}")
        if self.levels < (0 if self.task == "sparse" else 1):
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if any(s < 0 for s in self.seeds or ()):
            raise ValueError(f"seeds must be >= 0, got {self.seeds}")
        if self.task != "sparse":
            pretext.task(self.task, seed=0, blur_factor=self.blur_factor,
                         subset_fraction=self.subset_fraction)  # checks the parameters


def condition_label(settings: PretrainSettings) -> str:
    """Name of the condition in groups: the task with the parameter that defines it.

    The summary labels a ``real_task="full"`` condition with `FULL_SUFFIX` added.
    """
    task = settings.task
    if task in ("blur", "blur-rotation"):
        return f"{task}_x{settings.blur_factor}"
    if task == "subset":
        return f"subset_{settings.subset_fraction:g}"
    if task == "sparse":
        return f"sparse_rewind_{settings.rewind}_level_{settings.levels}"
    return task


def pretrain_group(settings: PretrainSettings, seed: int, part: str) -> str:
    """Group of one part (``"pretrain"``, ``"masks"``, ``"level_<n>"``) of one seed.

    The real-task parts (masks, levels) of ``real_task="from-n"`` sit in ``from_n/``.
    """
    mode = "from_n/" if part != "pretrain" and settings.real_task == "from-n" else ""
    return (f"experiments/pretrain/{condition_label(settings)}/steps_{settings.steps}/"
            f"seed_{seed}/{mode}{part}")


def pretrain_config(config: TrainConfig, steps: int) -> TrainConfig:
    """`config` cut to its first `steps` updates, each with the learning rate it had.

    Milestones are fractions of ``config.steps``; update i is past milestone m when
    ``i > m * T``, i.e. ``i >= floor(m * T) + 1``, so the cut run's milestone sits half
    an update before that, safe from rounding.
    """
    milestones = tuple((math.floor(m * config.steps) + 0.5) / steps for m in config.lr_milestones)
    return replace(config, steps=steps, lr_milestones=milestones)


def _head_swap(state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict:
    """`state` with every tensor whose shape differs from `like`'s taken from `like`."""
    return {k: (like[k] if tuple(v.shape) != tuple(like[k].shape) else v) for k, v in state.items()}


def run_pretrain(
    store: str | Path,
    settings: PretrainSettings,
    *,
    on_run: Callable[[str, int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> xr.Dataset:
    """Pre-train, then train the sparse networks, for every seed; skip complete groups.

    Args:
        store: A store recorded by ``ckpt record`` (``sparse``: with ``ckpt imp`` masks).
        settings: The experiment.
        on_run: Called as ``on_run(group, seed)`` before each training run.
        on_step: Called as ``on_step(step, loss)`` after every update.

    Returns:
        The summary of every pre-training experiment in the store (`pretrain_summary`),
        also written as the result ``analyses/pretrain_summary``.

    Raises:
        StoreError: ``sparse`` without the IMP mask (the message names the command).
        ValueError: ``real_task="from-n"`` with N at or past the run's T updates.
    """
    config = dense_config(store)
    if settings.real_task == "from-n" and settings.steps >= config.steps:
        raise ValueError(
            f"--real-task from-n trains updates N+1..T, so pre-training steps {settings.steps} "
            f"must be below the run's {config.steps}; use fewer --steps or --real-task full")
    specs = param_table(store)
    state_0 = load_state_dict(store, 0)
    for seed in settings.seeds or (config.order_seed,):
        real = replace(config, data_seed=seed,
                       eval_schedule=settings.eval_schedule or config.eval_schedule)
        pre = pretrain_config(real, settings.steps)
        if settings.task == "sparse":
            _sparse(store, settings, seed, real, pre, state_0, specs, on_run, on_step)
        else:
            _dense(store, settings, seed, real, pre, state_0, specs, on_run, on_step)
    summary = pretrain_summary(store)
    write_result(store, SUMMARY, summary)
    return summary


def _attrs(settings: PretrainSettings, seed: int, part: str, **extra) -> dict:
    # The real-task runs of from-n say so; full-mode runs keep the attributes earlier
    # versions wrote, so their groups in older stores are continued, not refused.
    mode = {"real_task": "from-n"} if part != "pretrain" and _start(settings) else {}
    return {"kind": "pretrain", "task": settings.task, "condition": condition_label(settings),
            "pretrain_steps": settings.steps, "seed": seed, "part": part,
            "blur_factor": settings.blur_factor, "subset_fraction": settings.subset_fraction,
            **mode, **extra}


def _start(settings: PretrainSettings) -> int:
    """The real-task step the pre-trained weights stand at: N (from-n) or 0 (full)."""
    return settings.steps if settings.real_task == "from-n" else 0


def _pretrained(store, settings, seed, pre, state_0, mask, task, on_run, on_step) -> dict:
    group = pretrain_group(settings, seed, "pretrain")
    init = dict(state_0)
    if task is not None and task.prepare is not None:
        fresh = build(pre, task=task)[0].state_dict()
        init = _head_swap(init, fresh)
    if on_run is not None:
        on_run(group, seed)
    train_sparse(store, pre, group=group, init=init, start_step=0, mask=mask,
                 schedule=settings.schedule, attrs=_attrs(settings, seed, "pretrain"),
                 on_step=on_step, task=task)
    return _head_swap(load_state_dict(store, settings.steps, group=group), state_0)


def _dense(store, settings, seed, real, pre, state_0, specs, on_run, on_step):
    task = pretext.task(settings.task, seed=seed, blur_factor=settings.blur_factor,
                        subset_fraction=settings.subset_fraction)
    start = _pretrained(store, settings, seed, pre, state_0, None, task, on_run, on_step)
    exclude = pruning_exclusions(settings.exclude_output, real, specs)
    pruning = {"fraction": settings.fraction, "scope": settings.scope, "exclude": exclude,
               "pretrained": pretrain_group(settings, seed, "pretrain"),
               **({"real_task": "from-n"} if _start(settings) else {})}
    masks = pretrain_group(settings, seed, "masks")

    def final_weights(level):
        return load_state_dict(store, real.steps, group=pretrain_group(settings, seed,
                                                                      f"level_{level}"))

    def train_level(level, mask):
        group = pretrain_group(settings, seed, f"level_{level}")
        if on_run is not None:
            on_run(group, seed)
        train_sparse(store, real, group=group, init=start, start_step=_start(settings),
                     mask=mask, schedule=settings.schedule,
                     attrs=_attrs(settings, seed, "imp", level=level,
                                  remaining=remaining_fraction(mask or {}, specs)),
                     on_step=on_step)

    run_lineage(store, masks, specs,
                Pruning(settings.fraction, settings.scope, tuple(exclude)),
                levels=range(settings.levels + 1), settings=pruning,
                final_weights=final_weights, train_level=train_level)


def _sparse(store, settings, seed, real, pre, state_0, specs, on_run, on_step):
    prunable = [s.name for s in specs if s.prunable]
    k, level = settings.rewind, settings.levels
    try:
        imp_mask = read_mask(store, k, level, seed)
    except StoreError as exc:
        raise exc.with_hint(f"sparse pre-training needs the IMP mask: run `ckpt imp {store} "
                            f"--rewind {k} --levels {level} --seeds {seed}` first") from None
    mask = {n: imp_mask[n] for n in prunable}
    start = _pretrained(store, settings, seed, pre, state_0, mask, None, on_run, on_step)
    group = pretrain_group(settings, seed, f"level_{level}")
    if on_run is not None:
        on_run(group, seed)
    train_sparse(store, real, group=group, init=start, start_step=_start(settings), mask=mask,
                 schedule=settings.schedule,
                 attrs=_attrs(settings, seed, "sparse", level=level,
                              remaining=remaining_fraction(mask, specs),
                              mask_group=mask_group(k, seed, store=store)), on_step=on_step)


def pretrain_summary(store: str | Path) -> xr.Dataset:
    """Results of every pre-training experiment stored in `store`.

    Returns:
        A Dataset with dimensions ``(task, pretrain_steps, level, seed)`` (``task``: the
        condition label, e.g. ``blur_x4``; with `FULL_SUFFIX` when the real task trained
        all T updates) holding ``test_accuracy``, ``test_loss`` (final real-task
        evaluation of each level's run), ``remaining`` (`pruning.remaining_fraction` of
        the level's mask) and ``real_task_updates`` (updates the real-task run applied,
        as recorded: T minus its start step), the coordinate ``real_task (task)``
        (``"from-n"`` or ``"full"``), and ``pretext_accuracy (task, pretrain_steps,
        seed)``: the last evaluation of the pre-training run on its own task (shared by
        both modes). NaN where not run.
    """
    config = dense_config(store)
    runs, pre, modes = {}, {}, {}
    for group in history_groups(store):
        m = _GROUP_RE.match(group)
        if not m:
            continue
        key = (m[1], int(m[2]), int(m[3]))
        if m[5] == "pretrain":
            pre[key] = group
        elif history_complete(store, group, config.steps):
            label = m[1] if m[4] else m[1] + FULL_SUFFIX
            modes[label] = "from-n" if m[4] else "full"
            runs[(label, *key[1:], int(m[6]))] = group
    # A pre-training run serves both modes: its accuracy goes to each label trained from it.
    pre_labels = {key: [c for c in (key[0], key[0] + FULL_SUFFIX)
                        if any(r[:3] == (c, *key[1:]) for r in runs)] or [key[0]]
                  for key in pre}
    for key, labels in pre_labels.items():
        for label in labels:
            modes.setdefault(label, "full" if label != key[0] else "from-n")
    conditions = sorted(modes)
    steps = sorted({k[1] for k in (*runs, *pre)})
    seeds = sorted({k[2] for k in (*runs, *pre)})
    levels = sorted({k[3] for k in runs})
    shape = (len(conditions), len(steps), len(levels), len(seeds))
    names = ("test_accuracy", "test_loss", "remaining", "real_task_updates")
    values = {v: np.full(shape, np.nan) for v in names}
    pretext_acc = np.full((len(conditions), len(steps), len(seeds)), np.nan)
    finished_pre = {key: g for key, g in pre.items() if history_complete(store, g, key[1])}
    evaluations = last_evaluations(store, [*runs.values(), *finished_pre.values()])
    for (c, n, s, level), group in runs.items():
        i = (conditions.index(c), steps.index(n), levels.index(level), seeds.index(s))
        metrics = evaluations[group]
        recorded = read_group_meta(store, group)["config"]
        values["remaining"][i] = recorded["experiment"].get("remaining", np.nan)
        values["real_task_updates"][i] = recorded["steps"] - recorded.get("start_step", 0)
        for name in ("test_accuracy", "test_loss"):
            values[name][i] = metrics.get(name, np.nan)
    for (c, n, s), group in finished_pre.items():
        acc = evaluations[group].get("test_accuracy", np.nan)
        for label in pre_labels[(c, n, s)]:
            pretext_acc[conditions.index(label), steps.index(n), seeds.index(s)] = acc
    dims = ("task", "pretrain_steps", "level", "seed")
    return xr.Dataset(
        {
            "test_accuracy": (dims, values["test_accuracy"], {"units": "fraction"}),
            "test_loss": (dims, values["test_loss"], {"units": "nats"}),
            "remaining": (dims, values["remaining"], {"units": "fraction of prunable weights"}),
            "real_task_updates": (dims, values["real_task_updates"],
                                  {"units": "optimizer updates on the real task"}),
            "pretext_accuracy": (("task", "pretrain_steps", "seed"), pretext_acc,
                                 {"units": "fraction, on the pre-training task"}),
        },
        coords={
            "task": np.asarray(conditions, dtype=object),  # variable-length strings in Zarr
            "pretrain_steps": np.asarray(steps, np.int64),
            "level": np.asarray(levels, np.int64),
            "seed": np.asarray(seeds, np.int64),
            "real_task": ("task", np.asarray([modes[c] for c in conditions], dtype=object)),
        },
    )


def read_pretrain_summary(store: str | Path) -> xr.Dataset:
    """The stored pre-training summary (``analyses/pretrain_summary``).

    Raises:
        StoreError: none stored (run ``ckpt pretrain`` first).
    """
    return read_result(store, SUMMARY)



def _run(store: Path, settings: PretrainSettings, progress: Progress) -> xr.Dataset:
    return run_pretrain(store, settings, on_run=lambda g, s: progress(f"training {g}"))


def _describe(summary: xr.Dataset, settings: PretrainSettings) -> SummaryTable:
    rows = []
    for t in summary.task.values:
        for n in summary.pretrain_steps.values:
            for level in summary.level.values:
                for s in summary.seed.values:
                    cell = summary.sel(task=t, pretrain_steps=n, level=level, seed=s)
                    acc = float(cell.test_accuracy)
                    if acc == acc:  # conditions not run are NaN
                        rows.append((str(t), str(n), str(level), str(s),
                                     f"{float(cell.remaining):.4f}",
                                     f"{int(cell.real_task_updates)}", f"{acc:.4f}"))
    return SummaryTable(
        "pre-training, then IMP (final test accuracy)",
        ("task", "pre-training steps", "level", "seed", "remaining", "real-task updates",
         "test accuracy"), rows)


def _presets() -> dict:
    from ckpt_tools.analyses.experiments.presets import PRESETS

    return {name: preset.pretrain for name, preset in PRESETS.items()}


EXPERIMENT = Experiment(
    name="pretrain",
    help="Pre-train on another task (or sparse), then run IMP rewinding to the pre-trained "
    "weights.",
    settings=PretrainSettings, run=_run, summary=pretrain_summary, summary_name=SUMMARY,
    presets=_presets, describe=_describe,
)
