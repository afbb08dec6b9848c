"""Linear mode connectivity from step k: the instability analysis of Frankle et al. (2020).

"Linear Mode Connectivity and the Lottery Ticket Hypothesis": two copies of the network
at step k are trained to the end with different data orders; the test error is measured
along the straight line between their final weights. The error barrier

    barrier = max_alpha err(alpha) - (err(0) + err(1)) / 2

is near zero once training from step k is stable to SGD noise, which is when rewinding
to k finds matching sparse sub-networks.

Batch normalisation: interpolating running statistics does not give the statistics of the
interpolated network, so by default (``bn="recompute"``) every point's running mean and
variance are re-estimated from `bn_batches` training batches (the same batches for every
point, endpoints included) before it is evaluated; ``bn="interpolate"`` interpolates the
stored running statistics instead. Models without BatchNorm are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import xarray as xr
from torch import nn

from ckpt_tools import batches, load_state_dict
from ckpt_tools.analyses.experiments.compat import locate
from ckpt_tools.analyses.experiments.contract import (
    Experiment,
    Progress,
    SummaryTable,
    parse_seeds,
    setting,
)
from ckpt_tools.analyses.experiments.pruning import (
    check_rewind_steps,
    dense_config,
    dense_source,
    history_complete,
    param_table,
    read_mask,
    train_sparse,
)
from ckpt_tools.store import StoreError, read_result, write_result
from ckpt_tools.train import TrainConfig, build, evaluate

__all__ = [
    "EXPERIMENT",
    "InstabilitySettings",
    "copy_group",
    "error_barrier",
    "interpolate",
    "path_metrics",
    "recompute_bn",
    "read_instability",
    "result_name",
    "run_instability",
]

PREFIX = "experiments/instability"  # every instability group lives below it

BnMode = Literal["recompute", "interpolate"]


@dataclass(frozen=True)
class InstabilitySettings:
    """One instability experiment.

    Attributes:
        rewind_steps: Steps k the copies start from (stored steps of ``train``).
        seeds: Data-order seeds of the copies, taken in consecutive pairs
            ``(seeds[0], seeds[1]), (seeds[2], seeds[3]), ...``; one barrier per pair.
        points: Evaluation points on the line, alpha = 0, 1/(points-1), ..., 1.
        bn: ``"recompute"`` or ``"interpolate"`` BatchNorm statistics (module docstring).
        bn_batches: Training batches used to re-estimate BatchNorm statistics.
        level: IMP level whose mask (lineage ``(k, imp_seed)``) the copies keep; None
            trains the dense network.
        imp_seed: Data seed of the IMP lineage that holds the mask; None: the dense
            run's order seed.
        schedule: Checkpoint schedule text of each copy (clipped to k..end); None: 21
            evenly spaced steps.
        eval_schedule: Evaluations during each copy's training; None: the dense run's.
    """

    rewind_steps: tuple[int, ...] = setting(
        option="--rewind",
        help="Step k the two copies start from (a stored step); repeat for several.")
    seeds: tuple[int, ...] = setting(
        (1, 2), parse=parse_seeds,
        help="Data-order seeds of the copies, in pairs: 1,2 (default) or 1,2,3,4 for two pairs.")
    points: int = setting(
        11, help="Points on the line between the copies, ends included (default 11).")
    bn: BnMode = setting(
        "recompute", help="recompute (default): re-estimate BatchNorm statistics at every "
        "point; interpolate: interpolate them.")
    bn_batches: int = setting(
        10, help="Training batches used to re-estimate BatchNorm statistics (default 10).")
    level: int | None = setting(
        None, help="Train the IMP sub-network of this level instead of the dense network.")
    imp_seed: int | None = setting(
        None, help="Seed of the IMP lineage holding that mask (default: the dense run's).")
    schedule: str | None = setting(
        None, help="Checkpoint schedule of each copy, clipped to k..end.")
    eval_schedule: str | None = setting(
        None, help="Test evaluations during each copy's training (default: the dense run's).")

    def __post_init__(self):
        if not self.rewind_steps:
            raise ValueError("give at least one rewind step")
        if len(self.seeds) < 2 or len(self.seeds) % 2:
            raise ValueError(f"give an even number of seeds (pairs of copies), got {self.seeds}")
        if any(a == b for a, b in zip(self.seeds[::2], self.seeds[1::2], strict=True)):
            raise ValueError(f"the two copies of a pair need different seeds, got {self.seeds}")
        if self.points < 2:
            raise ValueError(f"points must be at least 2, got {self.points}")
        if self.bn not in ("recompute", "interpolate"):
            raise ValueError(f"bn must be 'recompute' or 'interpolate', got {self.bn!r}")
        if self.bn_batches < 1:
            raise ValueError(f"bn_batches must be at least 1, got {self.bn_batches}")
        object.__setattr__(self, "rewind_steps", tuple(dict.fromkeys(self.rewind_steps)))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The seed pairs."""
        return list(zip(self.seeds[::2], self.seeds[1::2], strict=True))

    @property
    def prefix(self) -> str:
        """Group prefix: ``experiments/instability`` (dense) or ``.../level_<n>`` (masked)."""
        return PREFIX if self.level is None else f"{PREFIX}/level_{self.level}"


def copy_group(prefix: str, rewind: int, seed: int, *, store: str | Path | None = None) -> str:
    """History group of the copy trained from step `rewind` with data seed `seed`.

    With `store`, the group as that store holds it (`compat.locate`: older stores keep
    these groups at ``instability/...``).
    """
    group = f"{prefix}/rewind_{rewind}/seed_{seed}"
    return group if store is None else locate(store, group)


def result_name(level: int | None = None) -> str:
    """Result name of the dense (`level` None) or masked experiment.

    It is stored at ``analyses/<name>``: ``analyses/instability_summary`` or
    ``analyses/instability_level_<n>_summary``.
    """
    return "instability_summary" if level is None else f"instability_level_{level}_summary"


def read_instability(store: str | Path, level: int | None = None) -> xr.Dataset:
    """The stored instability result of the dense (or level-`level` masked) network.

    Raises:
        StoreError: none stored (run ``ckpt instability`` first).
    """
    try:
        return read_result(store, result_name(level))
    except StoreError as exc:
        if "has no result" not in str(exc):
            raise
        raise StoreError(f"{store} holds no instability results"
                         f"{'' if level is None else f' for level {level}'}; run "
                         "`ckpt instability` first") from None


def interpolate(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` for floating tensors; others (counters) from `a`."""
    return {
        name: torch.lerp(t, b[name], alpha) if t.is_floating_point() else t.clone()
        for name, t in a.items()
    }


@torch.no_grad()
def recompute_bn(model: nn.Module, x_batches: Sequence[torch.Tensor]) -> None:
    """Replace every BatchNorm layer's running statistics by their mean over `x_batches`.

    Each batch norm layer's statistics become the plain average of the per-batch
    statistics (PyTorch's cumulative moving average, ``momentum=None``).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in x_batches:
        model(x)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.train(was_training)


def path_metrics(
    config: TrainConfig,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    alphas: Sequence[float],
    *,
    bn: BnMode = "recompute",
    bn_batches: int = 10,
) -> dict[str, np.ndarray]:
    """Test error and loss of the interpolated networks between states `a` and `b`.

    Args:
        config: The run (model, dataset, batch size; ``order_seed`` picks the BatchNorm
            batches: those of updates 1..`bn_batches`).
        a: State dict (parameters and buffers) at alpha = 0.
        b: State dict at alpha = 1.
        alphas: Points on the line.
        bn: How BatchNorm statistics are obtained (module docstring).
        bn_batches: Training batches for ``bn="recompute"``.

    Returns:
        ``{"test_error": (alpha,), "test_loss": (alpha,)}`` (fraction, nats).
    """
    model, data = build(config)
    device = torch.device(config.device)
    xs = []
    if bn == "recompute":
        xs = [batches.batch_for_step(data, s, batch_size=config.batch_size,
                                     seed=config.order_seed, device=device)[0]
              for s in range(1, bn_batches + 1)]
    errors, losses = [], []
    for alpha in alphas:
        model.load_state_dict(interpolate(a, b, float(alpha)))
        if bn == "recompute":
            recompute_bn(model, xs)
        metrics = evaluate(model, data, batch_size=config.eval_batch_size, device=device)
        errors.append(1.0 - metrics["test_accuracy"])
        losses.append(metrics["test_loss"])
    return {"test_error": np.asarray(errors), "test_loss": np.asarray(losses)}


def error_barrier(values: np.ndarray) -> np.ndarray:
    """``max(values) - (values[0] + values[-1]) / 2`` along the last axis (alpha)."""
    values = np.asarray(values, dtype=np.float64)
    return values.max(axis=-1) - (values[..., 0] + values[..., -1]) / 2


def run_instability(
    store: str | Path,
    settings: InstabilitySettings,
    *,
    on_copy: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> xr.Dataset:
    """Train the copies from each rewind step, measure the path between them, store it.

    Copies already complete in the store are not trained again, and a rewind step whose
    path is stored (same pairs, points and BatchNorm settings) and whose copies are
    complete is not measured again. The result is merged into the stored one (rewind
    steps measured now replace earlier measurements).

    Returns:
        The stored result, a Dataset with ``test_error`` and ``test_loss``
        ``(rewind_step, pair, alpha)`` and ``barrier`` and ``loss_barrier``
        ``(rewind_step, pair)``; coordinates ``seed_a``/``seed_b`` ``(pair)``.

    Raises:
        StoreError: a rewind step is not stored (nearest ones listed), or the IMP mask
            asked for is missing.
    """
    check_rewind_steps(store, settings.rewind_steps, dense_config(store))
    config, dense_group = dense_source(store, on_step=on_step)
    config = replace(config, eval_schedule=settings.eval_schedule or config.eval_schedule)
    prunable = [s.name for s in param_table(store) if s.prunable]
    imp_seed = config.order_seed if settings.imp_seed is None else settings.imp_seed
    pairs = settings.pairs
    alphas = np.linspace(0.0, 1.0, settings.points)
    shape = (len(settings.rewind_steps), len(pairs), len(alphas))
    error, loss = np.full(shape, np.nan), np.full(shape, np.nan)
    stored = _stored_paths(store, settings, pairs, alphas)
    for i, k in enumerate(settings.rewind_steps):
        groups = [copy_group(settings.prefix, k, seed, store=store)
                  for seed in dict.fromkeys(settings.seeds)]
        if k in stored and all(history_complete(store, g) for g in groups):
            error[i], loss[i] = stored[k]  # measured before from the same copies
            continue
        mask = None
        if settings.level is not None:
            full = read_mask(store, k, settings.level, imp_seed)
            mask = {n: full[n] for n in prunable}
        start = load_state_dict(store, k)
        finals = {}
        for seed in dict.fromkeys(settings.seeds):
            group = copy_group(settings.prefix, k, seed, store=store)
            if not history_complete(store, group) and on_copy is not None:
                on_copy(k, seed)
            train_sparse(
                store, replace(config, data_seed=seed), group=group, init=start,
                start_step=k, mask=mask, schedule=settings.schedule, on_step=on_step,
                attrs={"kind": "instability", "rewind_step": k, "seed": seed,
                       "level": settings.level, "imp_seed": imp_seed if mask else None},
            )
            finals[seed] = load_state_dict(store, config.steps, group=group)
        for j, (sa, sb) in enumerate(pairs):
            m = path_metrics(config, finals[sa], finals[sb], alphas, bn=settings.bn,
                             bn_batches=settings.bn_batches)
            error[i, j], loss[i, j] = m["test_error"], m["test_loss"]
    new = _result(settings, pairs, alphas, error, loss, dense_group)
    merged = _merge(store, settings.level, new)
    write_result(store, result_name(settings.level), merged)
    return merged


def _stored_paths(store, settings: InstabilitySettings, pairs, alphas) -> dict:
    """Stored ``(test_error, test_loss)`` by rewind step, where they were measured as now.

    A path is deterministic given the copies' final weights, so one stored with the same
    pairs, points and BatchNorm settings is reused instead of evaluated again.
    """
    try:
        old = read_instability(store, settings.level)
    except StoreError:
        return {}
    same = (old.sizes.get("alpha") == len(alphas) and np.allclose(old["alpha"].values, alphas)
            and [tuple(p) for p in zip(old["seed_a"].values.tolist(),
                                       old["seed_b"].values.tolist(), strict=True)] == pairs
            and old.attrs.get("bn") == settings.bn
            and old.attrs.get("bn_batches") == settings.bn_batches)
    if not same:
        return {}
    out = {}
    for k in old.rewind_step.values:
        cell = old.sel(rewind_step=k)
        if np.isfinite(cell["test_error"].values).all():
            out[int(k)] = (cell["test_error"].values, cell["test_loss"].values)
    return out


def _result(settings, pairs, alphas, error, loss, dense_group) -> xr.Dataset:
    dims = ("rewind_step", "pair", "alpha")
    return xr.Dataset(
        {
            "test_error": (dims, error, {"units": "fraction"}),
            "test_loss": (dims, loss, {"units": "nats"}),
            "barrier": (dims[:2], error_barrier(error), {"units": "fraction (error)"}),
            "loss_barrier": (dims[:2], error_barrier(loss), {"units": "nats"}),
        },
        coords={
            "rewind_step": np.asarray(settings.rewind_steps, np.int64),
            "pair": np.arange(len(pairs), dtype=np.int64),
            "alpha": alphas,
            "seed_a": ("pair", np.asarray([a for a, _ in pairs], np.int64)),
            "seed_b": ("pair", np.asarray([b for _, b in pairs], np.int64)),
        },
        attrs={"bn": settings.bn, "bn_batches": settings.bn_batches,
               "level": -1 if settings.level is None else settings.level,
               "dense_group": dense_group},
    )


def _merge(store, level: int | None, new: xr.Dataset) -> xr.Dataset:
    try:
        old = read_instability(store, level)
    except StoreError:
        return new
    same = (old.sizes.get("alpha") == new.sizes["alpha"]
            and np.array_equal(old["seed_a"].values, new["seed_a"].values)
            and np.array_equal(old["seed_b"].values, new["seed_b"].values)
            and old.attrs.get("bn") == new.attrs["bn"])
    if not same:
        return new
    keep = old.drop_sel(rewind_step=[k for k in new.rewind_step.values
                                     if k in old.rewind_step.values])
    return xr.concat([keep, new], dim="rewind_step").sortby("rewind_step")


def _run(store: Path, settings: InstabilitySettings, progress: Progress) -> xr.Dataset:
    return run_instability(store, settings,
                           on_copy=lambda k, s: progress(f"rewind {k}: copy with seed {s}"))


def _describe(result: xr.Dataset, settings: InstabilitySettings) -> SummaryTable:
    rows = []
    for k in result.rewind_step.values:
        for p in result.pair.values:
            cell = result.sel(rewind_step=k, pair=p)
            err = cell.test_error.values
            rows.append((str(k), f"{int(cell.seed_a)},{int(cell.seed_b)}",
                         f"{err[0]:.4f} / {err[-1]:.4f}", f"{err.max():.4f}",
                         f"{float(cell.barrier):.4f}"))
    return SummaryTable(
        "instability: test error barrier along the linear path",
        ("rewind", "seeds", "error at ends", "max error", "barrier"), rows,
        f"result stored in analyses/{result_name(settings.level)}")


def _presets() -> dict:
    from ckpt_tools.analyses.experiments.presets import PRESETS

    return {name: vars(preset.instability) for name, preset in PRESETS.items()}


EXPERIMENT = Experiment(
    name="instability",
    help="Train two copies from step k with different data orders; report the error barrier.",
    settings=InstabilitySettings, run=_run, summary=lambda store: read_instability(store),
    summary_name=result_name(None), presets=_presets, describe=_describe,
)
