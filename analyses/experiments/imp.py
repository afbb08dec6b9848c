"""IMP with rewinding, level by level, from a recorded dense run; and its summary.

Lineage ``(k, s)`` for each rewind step k and data seed s (see ``docs/experiments.md``):

- level 0 is the recorded dense run (its weights at the configured last step);
- level n prunes `fraction` of the weights level n-1 kept, by magnitude of level n-1's
  final weights (`prune`), resets the survivors to the stored weights at step k
  (parameters and buffers), and trains from k to the end with the learning rate and
  data order continuing from k (order seed s) and a fresh optimizer.

Each level's mask is written before it is trained and each level is its own history
group, so a run interrupted at any point continues where it stopped: levels whose group
is complete are skipped, a half-written level is trained again with its stored mask.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import xarray as xr

from ckpt_tools import load_state_dict
from ckpt_tools.analyses.experiments.compat import legacy_name, locate
from ckpt_tools.analyses.experiments.contract import (
    Experiment,
    Progress,
    SummaryTable,
    parse_seeds,
    setting,
)
from ckpt_tools.analyses.experiments.lineage import Pruning, run_lineage
from ckpt_tools.analyses.experiments.pruning import (
    DENSE_GROUP,
    SUMMARY,
    Scope,
    check_rewind_steps,
    dense_config,
    dense_source,
    history_complete,
    level_group,
    mask_from_row,
    mask_group,
    output_weight,
    param_table,
    pruning_exclusions,
    remaining_fraction,
    train_sparse,
)
from ckpt_tools.store import StoreError, last_evaluations, read_result, write_result
from ckpt_tools.store import masks as mask_store
from ckpt_tools.tensors import TensorSpec
from ckpt_tools.train import TrainConfig, TrainResult

__all__ = [
    "EXPERIMENT",
    "ImpSettings",
    "imp_summary",
    "output_weight",
    "read_summary",
    "run_imp",
]

_MASKS_RE = re.compile(r"^(?:experiments/)?imp/rewind_(\d+)/seed_(\d+)/masks$")


@dataclass(frozen=True)
class ImpSettings:
    """One IMP experiment.

    Attributes:
        levels: Pruning levels after the dense level 0 (remaining ~ (1 - fraction)**n).
        rewind_steps: Steps k to rewind the survivors to (each a stored step of `train`).
        seeds: Data-order seeds of the retraining, one lineage each; None: the dense
            run's own order seed (the retraining sees the batches the dense run saw).
        fraction: Fraction of the surviving prunable weights pruned per level.
        scope: ``"global"`` (one magnitude threshold across layers) or ``"layer"``.
        exclude_output: True: never prune the output layer's weight; False: prune it with
            the others; None: the model family's default, as open_lth (ResNets and the
            convnet prune it, VGGs and LeNet do not; `pruning.output_excluded`).
        schedule: Checkpoint schedule text of each level (clipped to k..end); None: 21
            evenly spaced steps.
        eval_schedule: Test-set evaluations of each level; None: the dense run's.
    """

    levels: int = setting(help="Pruning levels after the dense level 0.")
    rewind_steps: tuple[int, ...] = setting(
        option="--rewind",
        help="Step k to rewind the survivors to (a stored step); repeat for several.")
    seeds: tuple[int, ...] | None = setting(
        None, parse=parse_seeds,
        help="Data-order seeds of the retraining, comma-separated (default: the dense run's).")
    fraction: float = setting(
        0.2, help="Fraction of the surviving weights pruned per level (default 0.2).")
    scope: Scope = setting(
        "global", help="global: one threshold across layers; layer: the same fraction per layer.")
    exclude_output: bool | None = setting(
        None, flag="--exclude-output/--include-output",
        help="Leave the output layer unpruned, or prune it (default: the model family's, "
        "as open_lth: ResNets and convnet prune it, VGG and LeNet do not).")
    schedule: str | None = setting(
        None, help="Checkpoint schedule of each level, clipped to k..end (default: 21 evenly "
        "spaced steps).")
    eval_schedule: str | None = setting(
        None, help="Test evaluations of each level (default: the dense run's).")

    def __post_init__(self):
        if self.levels < 1:
            raise ValueError(f"levels must be at least 1, got {self.levels}")
        if not self.rewind_steps:
            raise ValueError("give at least one rewind step")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {self.scope!r}")
        if any(s < 0 for s in self.seeds or ()):
            raise ValueError(f"seeds must be >= 0, got {self.seeds}")
        if any(k < 0 for k in self.rewind_steps):
            raise ValueError(f"rewind steps must be >= 0, got {self.rewind_steps}")
        object.__setattr__(self, "rewind_steps", tuple(dict.fromkeys(self.rewind_steps)))
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(dict.fromkeys(self.seeds)))


def _pruning(settings: ImpSettings, config: TrainConfig, specs: Sequence[TensorSpec]) -> dict:
    exclude = pruning_exclusions(settings.exclude_output, config, specs)
    return {"fraction": settings.fraction, "scope": settings.scope, "exclude": exclude}


def run_imp(
    store: str | Path,
    settings: ImpSettings,
    *,
    on_level: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_done: Callable[[int, int, int, TrainResult], None] | None = None,
) -> xr.Dataset:
    """Run (or continue) IMP with rewinding on the dense run recorded in `store`.

    Args:
        store: A store whose ``train`` group was recorded by ``ckpt record``.
        settings: The experiment.
        on_level: Called as ``on_level(k, seed, level)`` before a level is trained.
        on_step: Called as ``on_step(step, loss)`` after every update.
        on_done: Called as ``on_done(k, seed, level, result)`` after a level is trained.

    Returns:
        The summary (see `imp_summary`), also stored as the result ``analyses/imp_summary``.

    Raises:
        StoreError: a rewind step is not stored (the message lists the nearest ones),
            ``train`` has no built-in config, or the store holds this lineage with
            other pruning settings.
    """
    config = dense_config(store)
    check_rewind_steps(store, settings.rewind_steps, config)
    specs = param_table(store)
    pruning = _pruning(settings, config, specs)
    seeds = settings.seeds or (config.order_seed,)
    stored = {}
    for k in settings.rewind_steps:
        for seed in seeds:
            found = stored[k, seed] = mask_store.read_masks(store, mask_group(k, seed, store=store))
            wanted = {**pruning, "rewind_step": k, "seed": seed}
            if found is not None and {n: found.settings.get(n) for n in wanted} != wanted:
                raise StoreError(
                    f"IMP lineage rewind {k}, seed {seed} in {store} was pruned with "
                    f"fraction {found.settings.get('fraction')}, scope "
                    f"{found.settings.get('scope')}, exclude {found.settings.get('exclude')} "
                    f"(now {pruning['exclude']}); use those settings (--exclude-output or "
                    "--include-output for the output layer) or another store"
                )
    config, dense_group = dense_source(store, on_step=on_step)
    how = Pruning(settings.fraction, settings.scope, tuple(pruning["exclude"]))
    for k in settings.rewind_steps:
        rewound: dict = {}  # the stored weights at k, read once for every seed
        for seed in seeds:
            retrain = replace(config, data_seed=seed,
                              eval_schedule=settings.eval_schedule or config.eval_schedule)
            lineage = {**pruning, "rewind_step": k, "seed": seed, "dense_group": dense_group}
            masks = mask_group(k, seed, store=store)

            def final_weights(level, k=k, seed=seed):
                group = dense_group if level == 0 else level_group(k, level, seed, store=store)
                return load_state_dict(store, config.steps, group=group)

            def train_level(level, mask, k=k, seed=seed, retrain=retrain, lineage=lineage,
                            masks=masks, rewound=rewound):
                group = level_group(k, level, seed, store=store)
                if history_complete(store, group):
                    return
                if on_level is not None:
                    on_level(k, seed, level)
                if not rewound:
                    rewound.update(load_state_dict(store, k))
                result = train_sparse(
                    store, retrain, group=group, init=rewound, start_step=k, mask=mask,
                    schedule=settings.schedule,
                    attrs={"kind": "imp", **lineage, "level": level, "mask_group": masks},
                    on_step=on_step,
                )
                if on_done is not None:
                    on_done(k, seed, level, result)

            run_lineage(store, masks, specs, how, levels=range(1, settings.levels + 1),
                        settings=lineage, final_weights=final_weights, train_level=train_level)
    summary = imp_summary(store)
    write_result(store, SUMMARY, summary)
    return summary


def _dense_group(store: str | Path) -> str | None:
    for group in ("train", locate(store, DENSE_GROUP)):
        if history_complete(store, group):
            return group
    return None


def imp_summary(store: str | Path) -> xr.Dataset:
    """Results of every IMP level stored in `store`, gathered from its groups.

    Returns:
        A Dataset with dimensions ``(rewind_step, level, seed)`` holding ``remaining``
        (`remaining_fraction`: the fraction of all prunable weights, the output layer
        included, that the level's mask keeps; an output layer left out of pruning
        counts as kept), ``sparsity`` (1 - remaining), ``test_accuracy``
        and ``test_loss`` (last evaluation of the level, fraction and nats). Level 0 is
        the dense run, repeated for every rewind step and seed; levels not (yet) pruned
        or trained are NaN. Attributes: ``dense_test_accuracy``, ``dense_group``.
    """
    found = (_MASKS_RE.match(g) for under in ("experiments/imp", legacy_name("experiments/imp/"))
             for g in mask_store.mask_groups(store, under.rstrip("/")))
    lineages = sorted({(int(m[1]), int(m[2])) for m in found if m})
    rewinds = sorted({k for k, _ in lineages})
    seeds = sorted({s for _, s in lineages})
    masks = {(k, s): mask_store.read_masks(store, mask_group(k, s, store=store))
             for k, s in lineages}
    n_levels = max((m.masks.shape[0] for m in masks.values()), default=1)
    shape = (len(rewinds), n_levels, len(seeds))
    values = {v: np.full(shape, np.nan) for v in ("remaining", "test_accuracy", "test_loss")}
    dense_group = _dense_group(store)
    levels = {(k, level, seed): level_group(k, level, seed, store=store)
              for k, seed in lineages for level in range(1, n_levels)}
    levels = {key: g for key, g in levels.items() if history_complete(store, g)}
    evaluations = last_evaluations(store, [*([dense_group] if dense_group else []),
                                           *levels.values()])
    dense = evaluations.get(dense_group, {})
    for (k, seed), ms in masks.items():
        i, j = rewinds.index(k), seeds.index(seed)
        kept = [remaining_fraction(mask_from_row(row, ms.params), ms.params) for row in ms.masks]
        values["remaining"][i, : len(ms.written), j] = np.where(ms.written, kept, np.nan)
        for level in range(n_levels):
            source = dense if level == 0 else evaluations.get(levels.get((k, level, seed)), None)
            if source is None:
                continue
            for var in ("test_accuracy", "test_loss"):
                values[var][i, level, j] = source.get(var, np.nan)
    dims = ("rewind_step", "level", "seed")
    return xr.Dataset(
        {
            "remaining": (dims, values["remaining"], {"units": "fraction of prunable weights"}),
            "sparsity": (dims, 1.0 - values["remaining"], {"units": "fraction pruned"}),
            "test_accuracy": (dims, values["test_accuracy"], {"units": "fraction"}),
            "test_loss": (dims, values["test_loss"], {"units": "nats"}),
        },
        coords={"rewind_step": np.asarray(rewinds, np.int64),
                "level": np.arange(n_levels, dtype=np.int64),
                "seed": np.asarray(seeds, np.int64)},
        attrs={"dense_test_accuracy": dense.get("test_accuracy", np.nan),
               "dense_group": dense_group or ""},
    )


def read_summary(store: str | Path) -> xr.Dataset:
    """The stored IMP summary (``analyses/imp_summary``).

    Raises:
        StoreError: no IMP summary in the store (run ``ckpt imp`` first).
    """
    try:
        return read_result(store, SUMMARY)
    except StoreError as exc:
        if "has no result" not in str(exc):
            raise
        raise StoreError(f"{store} holds no IMP results; run `ckpt imp` first") from None


def _run(store: Path, settings: ImpSettings, progress: Progress) -> xr.Dataset:
    return run_imp(store, settings,
                   on_level=lambda k, s, n: progress(f"rewind {k}, seed {s}: level {n}"))


def _describe(summary: xr.Dataset, settings: ImpSettings) -> SummaryTable:
    rows = []
    for k in summary.rewind_step.values:
        for s in summary.seed.values:
            for n in summary.level.values:
                cell = summary.sel(rewind_step=k, seed=s, level=n)
                acc, rem = float(cell.test_accuracy), float(cell.remaining)
                if rem == rem:  # levels never pruned in this lineage are NaN
                    rows.append((str(k), str(s), str(n), f"{rem:.4f}",
                                 "-" if acc != acc else f"{acc:.4f}"))
    return SummaryTable(
        "IMP summary (final test accuracy)",
        ("rewind", "seed", "level", "remaining", "test accuracy"), rows,
        f"summary stored in analyses/{SUMMARY} ({summary.sizes['level'] - 1} levels)")


def _presets() -> dict:
    from ckpt_tools.analyses.experiments.presets import PRESETS

    return {name: vars(preset.imp) for name, preset in PRESETS.items()}


EXPERIMENT = Experiment(
    name="imp",
    help="Find sparse sub-networks by IMP with rewinding to step k; record every level.",
    settings=ImpSettings, run=_run, summary=imp_summary, summary_name=SUMMARY,
    presets=_presets, describe=_describe,
)
