"""Iterative magnitude pruning: masks, where they live in a store, and masked training.

The pieces every sparse experiment (IMP levels, ablations, pre-training) shares:

- `prune`: magnitude pruning of a fraction of the surviving weights (global or per layer);
- `write_mask` / `read_mask`: the mask of level n of an IMP lineage ``(rewind k, seed s)``,
  stored as a bool ``(level, param)`` array in ``imp/rewind_<k>/seed_<s>/masks``;
- `train_sparse`: train a masked network from a given start state and record it as a
  history group (pruned weights stay exactly zero: their gradients are masked before
  and their values after every optimizer update, so momentum and weight decay never
  move them); a group already complete is not trained again, a half-written one
  continues from its resume point (or is trained again when it has none);
- `dense_source`: the recorded dense run's config and the group holding its final weights;
- `output_excluded` / `pruning_exclusions`: whether the output layer is pruned, by model
  family (open_lth's defaults) unless the settings say; `remaining_fraction`: the
  reported sparsity, counted on the masks.

Store layout of an IMP lineage (see ``docs/experiments.md``)::

    train                                  the recorded dense run (level 0)
    imp/dense                              only if `train` stops before its last step
    imp/rewind_<k>/seed_<s>/masks          mask (level, param) bool, written (level)
    imp/rewind_<k>/seed_<s>/level_<n>      history of level n (n >= 1), steps k..end
    analyses/imp_summary                   (rewind_step, level, seed) results
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ckpt_tools import load_state_dict, open_history
from ckpt_tools.analyses.experiments.compat import locate
from ckpt_tools.schedule import Schedule, nearest
from ckpt_tools.store import (
    StoreError,
    as_location,
    last_evaluations,
    read_group_meta,
    read_root,
)
from ckpt_tools.store import masks as mask_store
from ckpt_tools.store.layout import to_json_safe
from ckpt_tools.tensors import TensorSpec, specs_from_json
from ckpt_tools.train import TrainConfig, TrainResult, train

__all__ = [
    "DENSE_GROUP",
    "SUMMARY",
    "check_rewind_steps",
    "Scope",
    "dense_config",
    "dense_source",
    "final_eval",
    "history_complete",
    "level_group",
    "level_schedule",
    "mask_from_row",
    "mask_group",
    "mask_to_row",
    "output_excluded",
    "output_weight",
    "param_table",
    "prune",
    "pruning_exclusions",
    "read_mask",
    "remaining_fraction",
    "stored_steps",
    "train_sparse",
    "write_mask",
]

Scope = Literal["global", "layer"]
DENSE_GROUP = "experiments/imp/dense"
SUMMARY = "imp_summary"  # result name: the summary lives at analyses/imp_summary


def level_group(rewind: int, level: int, seed: int, *, store: str | Path | None = None) -> str:
    """History group of IMP level `level` (>= 1) rewound to step `rewind`, data seed `seed`.

    With `store`, the group as that store holds it (`compat.locate`: older stores keep
    IMP groups at ``imp/...``).
    """
    group = f"experiments/imp/rewind_{rewind}/seed_{seed}/level_{level}"
    return group if store is None else locate(store, group)


def mask_group(rewind: int, seed: int, *, store: str | Path | None = None) -> str:
    """Mask group of the IMP lineage rewound to step `rewind` with data seed `seed`.

    With `store`, the group as that store holds it (see `level_group`).
    """
    group = f"experiments/imp/rewind_{rewind}/seed_{seed}/masks"
    return group if store is None else locate(store, group)


# -- pruning --------------------------------------------------------------------------------
def prune(
    weights: Mapping[str, np.ndarray | torch.Tensor],
    fraction: float,
    *,
    mask: Mapping[str, np.ndarray] | None = None,
    scope: Scope = "global",
    prunable: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Prune `fraction` of the surviving weights with the smallest magnitudes.

    Candidates are the entries of the `prunable` tensors, minus `exclude`, that `mask`
    keeps. ``ceil(fraction * n)`` of them are pruned (as open_lth does), where n counts
    the candidates of all layers together (``scope="global"``) or of each layer on its
    own (``scope="layer"``). Ties in magnitude are broken by position: the tensor that
    comes first in `weights` order, then the lower flat (C-order) index, is pruned first,
    so exactly that many entries are pruned whatever the ties.

    Args:
        weights: Tensors by name (numpy or torch, any shapes).
        fraction: Fraction of the candidates to prune, in [0, 1].
        mask: Current masks (True/1 = surviving) by name; missing names: all surviving.
        scope: ``"global"`` (one threshold across layers, the paper's default) or
            ``"layer"`` (the same fraction in every layer).
        prunable: Names of the tensors that may be pruned (default: all of `weights`).
        exclude: Names never pruned (e.g. the output layer ``"fc.weight"``).

    Returns:
        A bool array per name of `weights`, shaped like it: True where the weight
        survives. Tensors that are not candidates keep their current mask.

    Raises:
        ValueError: a fraction outside [0, 1], an unknown scope or name, or a mask
            whose shape differs from its weight's.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    arrays = {k: _numpy(v) for k, v in weights.items()}
    for label, names in (("prunable", prunable or ()), ("exclude", exclude),
                         ("mask", (mask or {}).keys())):
        unknown = sorted(set(names) - set(arrays))
        if unknown:
            raise ValueError(f"{label} names not among the weights: {', '.join(unknown)}")
    current = {}
    for name, w in arrays.items():
        m = np.ones(w.shape, bool) if mask is None or name not in mask else np.asarray(mask[name])
        if m.shape != w.shape:
            raise ValueError(f"mask of {name} has shape {m.shape}, weight has {w.shape}")
        current[name] = m.astype(bool, copy=True)
    chosen = set(arrays if prunable is None else prunable) - set(exclude)
    candidates = [name for name in arrays if name in chosen]
    groups = [candidates] if scope == "global" else [[name] for name in candidates]
    for names in groups:
        flat_mask = [current[n].reshape(-1) for n in names]
        alive = [np.flatnonzero(m) for m in flat_mask]
        magnitudes = np.concatenate(
            [np.abs(arrays[n].reshape(-1)[idx]) for n, idx in zip(names, alive, strict=True)]
        ) if names else np.zeros(0)
        n_prune = _count(fraction, magnitudes.size)
        if n_prune == 0:
            continue
        order = np.argsort(magnitudes, kind="stable")[:n_prune]
        bounds = np.cumsum([0, *(len(idx) for idx in alive)])
        for k in range(len(names)):
            hit = order[(order >= bounds[k]) & (order < bounds[k + 1])] - bounds[k]
            flat_mask[k][alive[k][hit]] = False
    return current


def _count(fraction: float, n: int) -> int:
    # Rounded first so that 0.2 * 100 (= 20.000000000000004) prunes 20, not 21.
    return min(n, math.ceil(round(fraction * n, 6)))


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# -- the output layer, and how much a mask keeps --------------------------------------------
# Model families whose output layer open_lth leaves unpruned (``pruning_layers_to_ignore =
# 'fc.weight'`` in their default hyperparameters): its VGGs and its MNIST LeNet. Its CIFAR
# and ImageNet ResNets prune it. Our convnet (BatchNorm after every conv, global average
# pooling, a small linear head) is built like the CIFAR ResNets and stands in for them in
# quick runs, so it prunes it too.
_OUTPUT_UNPRUNED_FAMILIES = ("vgg", "lenet")


def output_excluded(model: str) -> bool:
    """Whether the model family's default leaves the output layer unpruned (open_lth's).

    Args:
        model: A built-in model name (``resnet20``, ``vgg16``, ``lenet300``, ``convnet``).

    Returns:
        True for the VGG and LeNet families; False for ResNets, the convnet, and any
        other name (open_lth's pruning ignores no layer unless told to).
    """
    return model.startswith(_OUTPUT_UNPRUNED_FAMILIES)


def output_weight(specs: Sequence[TensorSpec]) -> str:
    """Name of the output layer's weight.

    ``fc.weight`` for the built-in models, else the last prunable 2-D parameter.

    Raises:
        StoreError: no prunable 2-D parameter.
    """
    names = [s.name for s in specs if s.prunable]
    if "fc.weight" in names:
        return "fc.weight"
    linear = [s.name for s in specs if s.prunable and len(s.shape) == 2]
    if not linear:
        raise StoreError("no linear output layer among the prunable parameters")
    return linear[-1]


def pruning_exclusions(
    exclude_output: bool | None, config: TrainConfig, specs: Sequence[TensorSpec]
) -> list[str]:
    """The parameters a lineage never prunes: the output layer's weight, or nothing.

    Args:
        exclude_output: True: leave the output layer unpruned; False: prune it; None: the
            family default of ``config.model`` (`output_excluded`).
        config: The dense run's config.
        specs: Its parameter table.
    """
    if exclude_output is None:
        exclude_output = output_excluded(config.model)
    return [output_weight(specs)] if exclude_output else []


def remaining_fraction(mask: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> float:
    """Fraction of the prunable weights a mask keeps: the reported ``remaining``.

    The denominator is every prunable tensor (conv and linear weights), the output layer
    included whether or not it was pruned, so the number is the network's true density.

    Args:
        mask: Bool (or 0/1) arrays by parameter name; prunable tensors it does not name
            count as kept whole.
        specs: The parameter table.
    """
    kept = total = 0
    for spec in specs:
        if spec.prunable:
            total += spec.size
            kept += int(np.count_nonzero(mask[spec.name])) if spec.name in mask else spec.size
    return kept / total if total else 1.0


# -- masks in the store ---------------------------------------------------------------------
def param_table(store: str | Path, group: str = "train") -> list[TensorSpec]:
    """The parameter table (name, shape, offset, prunable) of a recorded history."""
    return specs_from_json(read_group_meta(store, group)["params"])


def mask_to_row(mask: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> np.ndarray:
    """Flatten per-parameter masks into one bool `(param,)` row (missing names: True)."""
    row = np.ones(sum(s.size for s in specs), bool)
    for spec in specs:
        if spec.name in mask:
            row[spec.offset : spec.stop] = np.asarray(mask[spec.name], bool).reshape(-1)
    return row


def mask_from_row(row: np.ndarray, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Split a bool `(param,)` row into per-parameter masks shaped like the parameters."""
    return {s.name: np.asarray(row[s.offset : s.stop], bool).reshape(s.shape) for s in specs}


def write_mask(
    store: str | Path,
    rewind: int,
    level: int,
    seed: int,
    mask: Mapping[str, np.ndarray],
    *,
    settings: Mapping,
) -> None:
    """Store the mask of `level` of the lineage ``(rewind, seed)``.

    Args:
        store: The store.
        rewind: The rewind step k of the lineage.
        level: The pruning level (0 = dense, all True).
        seed: The data seed of the lineage.
        mask: Bool arrays by parameter name (missing parameters: never pruned).
        settings: The pruning settings (stored once; a later write with other settings
            is refused).

    Raises:
        StoreError: the lineage's masks were made with other settings.
    """
    specs = param_table(store)
    mask_store.write_mask_row(
        store, mask_group(rewind, seed, store=store), level, mask_to_row(mask, specs),
        params=specs, settings=settings,
    )


def read_mask(store: str | Path, rewind: int, level: int, seed: int) -> dict[str, np.ndarray]:
    """The stored mask of `level` of the lineage ``(rewind, seed)``, per parameter.

    Returns:
        A bool array per parameter (every parameter, shaped like it; True = surviving).

    Raises:
        StoreError: no such lineage or level (the message lists the stored levels).
    """
    row, specs = mask_store.read_mask_row(store, mask_group(rewind, seed, store=store), level)
    return mask_from_row(row, specs)


# -- the dense run and its stored steps -----------------------------------------------------
def stored_steps(store: str | Path, group: str = "train") -> np.ndarray:
    """The committed steps of a history group, increasing."""
    return np.asarray(open_history(store, group)["step"].values)


def check_rewind_steps(
    store: str | Path, rewinds: Sequence[int], config: TrainConfig, group: str = "train"
) -> None:
    """Check that every step in `rewinds` is stored in `group` and before the last step.

    Raises:
        StoreError: a step is not stored (the message lists the nearest stored steps).
        ValueError: a step is at or after ``config.steps``.
    """
    steps = stored_steps(store, group)
    for k in rewinds:
        if k not in steps:
            raise StoreError(
                f"rewind step {k} is not stored in '{group}' of {store}; nearest stored "
                f"steps: {', '.join(map(str, nearest(steps, k))) or 'none'}"
            )
        if k >= config.steps:
            raise ValueError(f"rewind step {k} must be before the run's last step {config.steps}")


def dense_config(store: str | Path, group: str = "train") -> TrainConfig:
    """The `TrainConfig` a built-in run was recorded with.

    Raises:
        StoreError: the history was recorded by a user's own loop (no built-in config).
    """
    try:
        meta = read_group_meta(store, group)
    except StoreError:
        read_root(store)  # a missing or foreign store says so first
        raise
    if meta.get("kind") != "history":
        raise StoreError(f"group '{group}' in {store} is not a recorded history")
    config = meta.get("config") or {}
    if not {"model", "dataset", "steps"} <= set(config):
        raise StoreError(
            f"'{group}' in {store} was not recorded by `ckpt record` (no built-in training "
            "config), so it cannot be retrained from; record the run with `ckpt record`"
        )
    return TrainConfig.from_dict(config)


def dense_source(
    store: str | Path, *, on_step: Callable[[int, float], None] | None = None
) -> tuple[TrainConfig, str]:
    """The dense run's config and the group holding its weights at the configured end.

    When ``train`` stops before ``config.steps`` (an interrupted recording), the dense
    network is trained on from its last stored step, with the same learning-rate
    schedule and data order and a fresh optimizer, into ``experiments/imp/dense`` (``train`` is
    left as it is).
    """
    config = dense_config(store)
    if history_complete(store, "train"):
        return config, "train"
    last = int(stored_steps(store)[-1])
    dense = locate(store, DENSE_GROUP)
    train_sparse(
        store, config, group=dense, init=load_state_dict(store, last), start_step=last,
        mask=None, attrs={"kind": "dense", "continued_from": last}, on_step=on_step,
    )
    return config, dense


# -- recorded runs of masked networks -------------------------------------------------------
def history_complete(store: str | Path, group: str, final_step: int | None = None) -> bool:
    """Whether `group` holds a finished history (one whose recording ran to its end).

    With `final_step`, also that the history's rows and evaluations include that step.
    Reads only the group's own metadata.
    """
    meta = _group_meta(store, group)
    if meta is None or meta.get("kind") != "history" or not meta.get("complete"):
        return False
    if final_step is None:
        return True
    start = (meta.get("config") or {}).get("start_step", 0)
    evals = meta.get("eval_schedule")
    return (final_step >= start and final_step in Schedule.from_json(meta["schedule"])
            and (not evals or final_step in Schedule.from_json(evals)))


def _group_meta(store: str | Path, group: str) -> dict | None:
    try:
        return read_group_meta(store, group)
    except StoreError:
        return None


def final_eval(store: str | Path, group: str) -> dict[str, float]:
    """The last stored evaluation of a history (e.g. ``test_accuracy``), {} if none."""
    return last_evaluations(store, [group])[group]


def level_schedule(config: TrainConfig, start_step: int, text: str | None = None) -> Schedule:
    """Checkpoint schedule of a run trained from `start_step` to ``config.steps``.

    Args:
        config: The run (its ``steps`` is the final step).
        start_step: The first recorded step (the rewind step).
        text: A schedule text (clipped to ``[start_step, config.steps]``); None: 21
            evenly spaced steps from `start_step` to the end.

    Returns:
        A schedule holding `start_step`, the final step and the steps between them (and
        step 0, which every schedule holds; it stays unrecorded when ``start_step > 0``).
    """
    end = config.steps
    if not 0 <= start_step <= end:
        raise ValueError(f"start step {start_step} is outside the run's 0..{end}")
    if text is None:
        steps = range(start_step, end, max(1, (end - start_step) // 20))
    else:
        steps = [s for s in Schedule.parse(text, final=end) if s >= start_step]
    return Schedule.from_steps([start_step, *steps], final=end)


def train_sparse(
    store: str | Path,
    config: TrainConfig,
    *,
    group: str,
    init: Mapping[str, torch.Tensor],
    start_step: int,
    mask: Mapping[str, np.ndarray] | None,
    schedule: Schedule | str | None = None,
    attrs: Mapping | None = None,
    overwrite: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    **train_options,
) -> TrainResult:
    """Train a (masked) network from `init` at `start_step` to the end and record it.

    The learning rate and data order continue from `start_step` as in an uninterrupted
    run of `config` (whose ``data_seed`` picks the order); the optimizer is fresh. The
    weights `mask` prunes are zeroed in `init` and stay exactly zero.

    A `group` that already holds the complete run is not trained again (its stored
    result is returned), unless `overwrite`. A half-written group of the same run
    continues from its last resume point, exactly as if never interrupted; any other
    partial group is trained again from `start_step`.

    Args:
        store: The store.
        config: The run (``steps`` is the final step).
        group: History group to record into (e.g. ``level_group(k, n, s)``).
        init: Parameters and buffers to start from (e.g. ``load_state_dict(store, k)``).
        start_step: The step `init` belongs to.
        mask: Bool (or 0/1) arrays by parameter name; None trains the dense network.
        schedule: Checkpoint schedule (default: ``level_schedule(config, start_step)``).
        attrs: JSON-able description stored as ``config["experiment"]`` of the group;
            a complete group with other `attrs` is refused.
        overwrite: Train again even if the group is complete.
        on_step: Called as ``on_step(step, loss)`` after every update.
        **train_options: Passed on to `ckpt_tools.train.train` (e.g. ``task``).

    Returns:
        The run's result (``final_eval`` holds the last evaluation).

    Raises:
        StoreError: `group` is complete but was recorded with other `attrs`.
    """
    attrs = to_json_safe(dict(attrs or {}))
    meta = _group_meta(store, group)
    if meta is not None and meta.get("complete") and not overwrite:
        stored = meta.get("config", {})
        if attrs and stored.get("experiment") != attrs:
            raise StoreError(
                f"group '{group}' in {store} was recorded with other settings "
                f"({stored.get('experiment')}); use another store or remove the group"
            )
        where = as_location(store)
        out = where.path if where.is_local else where
        return TrainResult(out, group, config.steps, final_eval(store, group))
    if isinstance(schedule, str):
        schedule = level_schedule(config, start_step, schedule)
    schedule = schedule or level_schedule(config, start_step)
    trainable = None
    if mask is not None:
        trainable = {k: np.asarray(v, dtype=np.float32) for k, v in mask.items()
                     if not np.all(np.asarray(v, bool))}
    expected = to_json_safe({**config.to_dict(), "experiment": attrs, "start_step": start_step})
    # A half-written run of the same experiment continues from its resume point (bit
    # for bit); anything else in the way is trained again from the start.
    resume = (meta is not None and not overwrite and meta.get("kind") == "history"
              and isinstance(meta.get("resume"), dict) and meta.get("config") == expected
              and meta.get("schedule") == schedule.to_json())
    return train(
        config, store, group=group, overwrite=not resume, resume=resume, init=init,
        start_step=start_step, mask=trainable, schedule=schedule,
        extra_attrs={"experiment": attrs}, on_step=on_step, **train_options,
    )
