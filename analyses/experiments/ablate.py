"""Ablations of the IMP sub-network at step k, trained from a store and recorded in it.

For rewind step k, IMP level L, each ablation kind (`ckpt_tools.analyses.experiments.perturb.
ABLATIONS`) and each data seed s:

1. the mask is level L of the IMP lineage ``(k, s)`` (``imp/rewind_<k>/seed_<s>/masks``,
   written by ``ckpt imp``);
2. the ablation builds new starting values for the prunable tensors (conv and linear
   weights, the output layer included) from the stored weights at steps 0 and k and
   the mask (and may replace the mask: ``random_mask``); every other parameter and
   every buffer is the stored value at step k; the ablation's random draws use seed s;
3. the sub-network is trained from k to the end exactly as IMP level L is (learning
   rate and data order continuing from k with order seed s, a fresh optimizer, pruned
   weights held at zero), so ``signs_k_mags_k`` reproduces IMP level L;
4. the run is recorded as ``experiments/ablate/<condition>/rewind_<k>/level_<L>/seed_<s>``,
   where the condition is the kind, or ``<kind>_alpha_<alpha>`` for the noise kinds
   (``noise_alpha_<alpha>``, ``noise_norm_matched_alpha_<alpha>``).

The summary (the result ``analyses/ablate_summary``) is gathered from every ablation group in the
store after each call (see `ablation_summary`). A complete group is not trained again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ckpt_tools import load_state_dict
from ckpt_tools.analyses.experiments.contract import (
    Experiment,
    Progress,
    SummaryTable,
    parse_seeds,
    setting,
)
from ckpt_tools.analyses.experiments.imp import read_summary
from ckpt_tools.analyses.experiments.perturb import ABLATIONS, Start
from ckpt_tools.analyses.experiments.pruning import (
    dense_config,
    history_complete,
    mask_group,
    param_table,
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
from ckpt_tools.train import TrainResult

__all__ = [
    "EXPERIMENT",
    "NOISE_KINDS",
    "SUMMARY",
    "AblationSettings",
    "ablation_group",
    "ablation_summary",
    "condition_label",
    "read_ablation_summary",
    "run_ablations",
]

NOISE_KINDS = ("noise", "noise_norm_matched")  # the kinds run once per --alpha
SUMMARY = "ablate_summary"  # result name: the summary lives at analyses/ablate_summary

_GROUP_RE = re.compile(r"^experiments/ablate/(.+)/rewind_(\d+)/level_(\d+)/seed_(\d+)$")


@dataclass(frozen=True)
class AblationSettings:
    """One ablation experiment.

    Attributes:
        rewind: The rewind step k (IMP must have run with it).
        kinds: Names from `ABLATIONS`.
        level: The IMP level whose mask is ablated; None: the highest level stored for k.
        seeds: Data seeds (one IMP lineage each); None: every lineage stored for k.
        alphas: Noise scales of the `NOISE_KINDS` (in units of each layer's std), one
            run each.
        schedule: Checkpoint schedule of each run (clipped to k..end); None: 21 steps.
        eval_schedule: Test evaluations of each run; None: the dense run's.
    """

    rewind: int = setting(
        help="Rewind step k of the IMP lineage (run `ckpt imp` with it first).")
    kinds: tuple[str, ...] = setting(
        option="--kind", choices=tuple(sorted(ABLATIONS)),
        help="Ablation to run; repeat for several.")
    level: int | None = setting(
        None, help="IMP level whose mask is ablated (default: the highest stored).")
    seeds: tuple[int, ...] | None = setting(
        None, parse=parse_seeds,
        help="Data seeds, comma-separated, one IMP lineage each (default: every lineage "
        "stored).")
    alphas: tuple[float, ...] = setting(
        (1.0,), option="--alpha",
        help="Noise scale of --kind noise and noise_norm_matched, in layer standard "
        "deviations (default 1); repeat for several.")
    schedule: str | None = setting(
        None, help="Checkpoint schedule of each run, clipped to k..end (default: 21 evenly "
        "spaced steps).")
    eval_schedule: str | None = setting(
        None, help="Test evaluations of each run (default: the dense run's).")

    def __post_init__(self):
        if not self.kinds:
            raise ValueError("give at least one ablation kind")
        unknown = [k for k in self.kinds if k not in ABLATIONS]
        if unknown:
            raise ValueError(
                f"unknown ablation {unknown[0]!r}; known: {', '.join(sorted(ABLATIONS))}"
            )
        if self.level is not None and self.level < 0:
            raise ValueError(f"level must be >= 0, got {self.level}")
        if any(not (a >= 0 and math.isfinite(a)) for a in self.alphas) or not self.alphas:
            raise ValueError(f"noise scales alpha must be finite and >= 0, got {self.alphas}")
        if any(s < 0 for s in self.seeds or ()):
            raise ValueError(f"seeds must be >= 0, got {self.seeds}")
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(self.kinds)))
        object.__setattr__(self, "alphas", tuple(dict.fromkeys(float(a) for a in self.alphas)))


def condition_label(kind: str, alpha: float | None = None) -> str:
    """Name of a condition in groups and summaries: the kind, ``<kind>_alpha_<a>`` for noise."""
    return f"{kind}_alpha_{alpha:g}" if kind in NOISE_KINDS else kind


def ablation_group(condition: str, rewind: int, level: int, seed: int) -> str:
    """History group of one ablated run."""
    return f"experiments/ablate/{condition}/rewind_{rewind}/level_{level}/seed_{seed}"


def _imp_lineages(store: str | Path, rewind: int) -> xr.Dataset:
    hint = f"run `ckpt imp {store} --rewind {rewind} --levels N` first"
    try:
        summary = read_summary(store)
    except StoreError:
        raise StoreError(f"{store} holds no IMP masks; {hint}") from None
    if rewind not in summary.rewind_step.values:
        stored = ", ".join(str(int(k)) for k in summary.rewind_step.values) or "none"
        raise StoreError(
            f"{store} has no IMP masks for rewind step {rewind} (IMP rewind steps stored: "
            f"{stored}); {hint}"
        )
    return summary.sel(rewind_step=rewind)


def _resolve(store: str | Path, settings: AblationSettings) -> tuple[int, tuple[int, ...]]:
    lineages = _imp_lineages(store, settings.rewind)["remaining"]  # (level, seed)
    stored = lineages.notnull()
    level = settings.level
    if level is None:
        levels = stored.any("seed")
        level = int(lineages.level.values[np.flatnonzero(levels.values)].max())
    if settings.seeds:
        seeds = settings.seeds
    elif level in lineages.level.values:
        seeds = tuple(int(s) for s in lineages.seed.values[stored.sel(level=level).values])
    else:
        seeds = ()
    if not seeds:
        raise StoreError(
            f"{store} has no IMP mask of level {level} for rewind step {settings.rewind}; "
            f"run `ckpt imp {store} --rewind {settings.rewind} --levels {level}` first"
        )
    return level, seeds


def _mask(store: str | Path, rewind: int, level: int, seed: int) -> dict[str, np.ndarray]:
    try:
        return read_mask(store, rewind, level, seed)
    except StoreError as exc:
        raise exc.with_hint(f"run `ckpt imp {store} --rewind {rewind} --levels {level} "
                            f"--seeds {seed}` first") from None


def run_ablations(
    store: str | Path,
    settings: AblationSettings,
    *,
    on_run: Callable[[str, int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> xr.Dataset:
    """Train and record every ablated run of `settings` (skipping complete ones).

    Args:
        store: A store with IMP masks for ``settings.rewind`` (``ckpt imp``).
        settings: The experiment.
        on_run: Called as ``on_run(condition, seed)`` before each run.
        on_step: Called as ``on_step(step, loss)`` after every update.

    Returns:
        The summary of every ablation in the store (see `ablation_summary`), also
        written as the result ``analyses/ablate_summary``.

    Raises:
        StoreError: no IMP mask for the rewind step, level or a seed (the message says
            which ``ckpt imp`` command writes it); the rewind step is not stored.
    """
    config = dense_config(store)
    k = settings.rewind
    if not 0 <= k < config.steps:
        raise ValueError(f"rewind step {k} must be in 0..{config.steps - 1}")
    level, seeds = _resolve(store, settings)
    specs = param_table(store)
    prunable = [s.name for s in specs if s.prunable]
    state_k = load_state_dict(store, k)
    state_0 = load_state_dict(store, 0)
    w0 = {n: state_0[n].numpy() for n in prunable}
    wk = {n: state_k[n].numpy() for n in prunable}
    conditions = [
        (kind, alpha) for kind in settings.kinds
        for alpha in (settings.alphas if kind in NOISE_KINDS else (None,))
    ]
    for seed in seeds:
        imp_mask = _mask(store, k, level, seed)
        start = Start(w0, wk, {n: imp_mask[n] for n in prunable})
        retrain = replace(config, data_seed=seed,
                          eval_schedule=settings.eval_schedule or config.eval_schedule)
        for kind, alpha in conditions:
            condition = condition_label(kind, alpha)
            if on_run is not None:
                on_run(condition, seed)
            _train_one(store, retrain, settings, start, kind, alpha, condition, level, seed,
                       state_k, specs, on_step)
    summary = ablation_summary(store)
    write_result(store, SUMMARY, summary)
    return summary


def _train_one(store, config, settings, start, kind, alpha, condition, level, seed, state_k,
               specs, on_step) -> TrainResult:
    ablated = ABLATIONS[kind](start, seed=seed, alpha=1.0 if alpha is None else alpha)
    init = dict(state_k)
    init.update({n: torch.from_numpy(np.ascontiguousarray(w)) for n, w in ablated.weights.items()})
    attrs = {
        "kind": "ablation", "ablation": kind, "alpha": alpha, "condition": condition,
        "rewind_step": settings.rewind, "level": level, "seed": seed,
        "mask_group": mask_group(settings.rewind, seed, store=store),
        "remaining": remaining_fraction(ablated.mask, specs),
    }
    return train_sparse(
        store, config, group=ablation_group(condition, settings.rewind, level, seed),
        init=init, start_step=settings.rewind, mask=ablated.mask, schedule=settings.schedule,
        attrs=attrs, on_step=on_step,
    )


def ablation_summary(store: str | Path) -> xr.Dataset:
    """Results of every ablated run stored in `store`, gathered from its groups.

    Returns:
        A Dataset with dimensions ``(kind, rewind_step, level, seed)``, where ``kind``
        holds condition labels (``<kind>_alpha_<a>`` for the noise kinds), with
        coordinates ``ablation (kind)`` (the `ABLATIONS` name) and ``alpha (kind)`` (NaN
        but for the noise kinds), and variables ``test_accuracy`` and ``test_loss``
        (final evaluation; NaN where not run or incomplete) and ``remaining`` (fraction
        of the prunable weights the run's mask keeps).
    """
    config = dense_config(store)
    found = {}
    for group in history_groups(store):
        m = _GROUP_RE.match(group)
        if m and history_complete(store, group, config.steps):
            found[(m[1], int(m[2]), int(m[3]), int(m[4]))] = group
    axes = [sorted({key[i] for key in found}) for i in range(4)]
    shape = tuple(len(a) for a in axes)
    values = {v: np.full(shape, np.nan) for v in ("test_accuracy", "test_loss", "remaining")}
    meta: dict[str, tuple[str, float]] = {}
    evaluations = last_evaluations(store, found.values())
    for key, group in found.items():
        index = tuple(a.index(v) for a, v in zip(axes, key, strict=True))
        experiment = read_group_meta(store, group)["config"]["experiment"]
        alpha = experiment.get("alpha")
        meta[key[0]] = (experiment["ablation"], np.nan if alpha is None else float(alpha))
        values["remaining"][index] = experiment["remaining"]
        metrics = evaluations[group]
        for name in ("test_accuracy", "test_loss"):
            values[name][index] = metrics.get(name, np.nan)
    dims = ("kind", "rewind_step", "level", "seed")
    return xr.Dataset(
        {
            "test_accuracy": (dims, values["test_accuracy"], {"units": "fraction"}),
            "test_loss": (dims, values["test_loss"], {"units": "nats"}),
            "remaining": (dims, values["remaining"], {"units": "fraction of prunable weights"}),
        },
        coords={
            "kind": np.asarray(axes[0], dtype=object),  # variable-length strings in Zarr
            "rewind_step": np.asarray(axes[1], np.int64),
            "level": np.asarray(axes[2], np.int64),
            "seed": np.asarray(axes[3], np.int64),
            "ablation": ("kind", np.asarray([meta[c][0] for c in axes[0]], dtype=object)),
            "alpha": ("kind", np.asarray([meta[c][1] for c in axes[0]], dtype=np.float64)),
        },
    )


def read_ablation_summary(store: str | Path) -> xr.Dataset:
    """The stored ablation summary (``analyses/ablate_summary``).

    Raises:
        StoreError: none stored (run ``ckpt ablate`` first).
    """
    return read_result(store, SUMMARY)


def _run(store: Path, settings: AblationSettings, progress: Progress) -> xr.Dataset:
    summary = run_ablations(
        store, settings, on_run=lambda c, s: progress(f"rewind {settings.rewind}: {c}, seed {s}"))
    return summary.sel(rewind_step=settings.rewind)


def _describe(summary: xr.Dataset, settings: AblationSettings) -> SummaryTable:
    rows = []
    for c in summary.kind.values:
        for n in summary.level.values:
            for s in summary.seed.values:
                cell = summary.sel(kind=c, level=n, seed=s)
                acc = float(cell.test_accuracy)
                if acc == acc:  # conditions not run are NaN
                    rows.append((str(c), str(n), str(s), f"{float(cell.remaining):.4f}",
                                 f"{acc:.4f}"))
    return SummaryTable("ablations (final test accuracy)",
                        ("kind", "level", "seed", "remaining", "test accuracy"), rows)


def _presets() -> dict:
    from ckpt_tools.analyses.experiments.presets import PRESETS

    return {name: preset.ablate for name, preset in PRESETS.items()}


EXPERIMENT = Experiment(
    name="ablate",
    help="Ablate the IMP sub-network at step k (signs, magnitudes, permutations, noise, "
    "controls).",
    settings=AblationSettings, run=_run, summary=ablation_summary, summary_name=SUMMARY,
    presets=_presets, describe=_describe,
)
