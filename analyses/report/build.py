"""The report: every available chart of one or more recorded runs, with a summary table.

A report is a list of sections; a section is a function from the runs to named charts
and is left out when it returns none (its data is absent). A new family of figures (for
example IMP or ablations, read from each run's `tree`) is one more `Section` in
`SECTIONS`. Rendering to one self-contained HTML page, or to PNG/SVG files, lives in
`ckpt_tools.analyses.report.page`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import xarray as xr
from ckpt_tools.analyses.report import ablation_charts, charts, imp_charts

from ckpt_tools import open_history, open_store
from ckpt_tools.store import StoreError, list_results, read_result, store_info

__all__ = [
    "SECTIONS",
    "Report",
    "Run",
    "Section",
    "build_report",
    "load_runs",
    "summary_table",
]


@dataclass(frozen=True, eq=False)
class Run:
    """One recorded history as the report sees it.

    Attributes:
        name: label of the run in legends and the summary table.
        path: the store.
        group: the history group inside the store (e.g. ``train``).
        history: the history, lazily opened (committed steps only).
        telemetry: its telemetry (stored by ``ckpt analyze`` or computed here), or None.
        evaluation: the stored post-hoc evaluation (``test_loss``, ``test_accuracy`` on
            ``step``), or None.
        info: ``store_info(path)``.
        tree: the whole store, lazily opened, for sections that read other groups.
    """

    name: str
    path: Path
    group: str
    history: xr.Dataset
    telemetry: xr.Dataset | None
    evaluation: xr.Dataset | None
    info: dict
    tree: xr.DataTree


Figures = dict[str, alt.TopLevelMixin]  # chart name (used in file names) -> chart


@dataclass(frozen=True)
class Section:
    """A titled group of figures; `figures(runs)` returns ``{}`` when its data is absent."""

    title: str
    figures: Callable[[Sequence[Run]], Figures]
    description: str = ""


@dataclass(frozen=True)
class Report:
    """What a report shows: a title, the summary table, and ``(section, figures)`` pairs."""

    title: str
    summary: pd.DataFrame
    sections: list[tuple[Section, Figures]]


def _names(paths: Sequence[Path]) -> list[str]:
    """Store names without ``.zarr``; repeated names get their parent folder prefixed."""
    stems = [p.name.removesuffix(".zarr") or p.name for p in paths]
    return [
        f"{p.parent.name}/{s}" if stems.count(s) > 1 and p.parent.name else s
        for p, s in zip(paths, stems, strict=True)
    ]


def _stored(path: Path, name: str, group: str, history: xr.Dataset) -> xr.Dataset | None:
    """The result `name` that ``ckpt analyze`` stored for `group`, if it covers every step.

    A result computed before the history grew (a resumed run) is ignored.
    """
    if not any(r["analysis"] == name and r["group"] == group for r in list_results(path)):
        return None
    result = read_result(path, name, group=group)
    if name == "telemetry" and not np.array_equal(result["step"].values, history["step"].values):
        return None
    return result


def _telemetry(path: Path, group: str, history: xr.Dataset) -> xr.Dataset:
    """The stored telemetry of `group` if ``ckpt analyze`` wrote it, else computed now."""
    stored = _stored(path, "telemetry", group, history)
    if stored is not None:
        return stored
    from ckpt_tools.analyses import telemetry

    return telemetry.compute(history)


def load_runs(
    paths: Sequence[str | Path], *, group: str = "train", names: Sequence[str] | None = None
) -> list[Run]:
    """Open each store's history `group` with its telemetry and post-hoc evaluation.

    Raises:
        StoreError: a store is missing, unreadable, or has no such history group.
        ValueError: no store, a store given twice, or `names` not one distinct name per
            store.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no stores given")
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise ValueError(f"store {paths[i]} is given twice")
    names = list(names) if names is not None else _names(paths)
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct run name per store, got {names}")
    runs = []
    for name, path in zip(names, paths, strict=True):
        history = open_history(path, group)
        if history.sizes.get("step", 0) == 0:
            raise StoreError(f"'{group}' in {path} has no recorded steps yet")
        runs.append(Run(
            name=name, path=path, group=group, history=history,
            telemetry=_telemetry(path, group, history),
            evaluation=_stored(path, "evaluate", group, history),
            info=store_info(path), tree=open_store(path),
        ))
    return runs


def _both(make: Callable[..., alt.TopLevelMixin], data, *, stack: bool = False):
    """The same panel on a linear and on a logarithmic step axis, side by side."""
    pair = (make(data, log_steps=False), make(data, log_steps=True))
    return alt.vconcat(*pair) if stack else alt.hconcat(*pair)


def _telemetry_of(runs: Sequence[Run], *needed: str) -> dict[str, xr.Dataset]:
    return {r.name: r.telemetry for r in runs
            if r.telemetry is not None and all(v in r.telemetry for v in needed)}


def _training_figures(runs: Sequence[Run]) -> Figures:
    histories = {r.name: r.history for r in runs}
    evaluations = {r.name: r.evaluation for r in runs if r.evaluation is not None}
    figures = {}
    if any("loss" in h or "test_loss" in h for h in histories.values()):
        figures["loss"] = _both(
            lambda d, log_steps: charts.chart_loss(d, evaluations=evaluations,
                                                   log_steps=log_steps), histories)
    if any("test_accuracy" in h for h in histories.values()) or any(
            "test_accuracy" in e for e in evaluations.values()):
        figures["accuracy"] = _both(
            lambda d, log_steps: charts.chart_accuracy(d, evaluations=evaluations,
                                                       log_steps=log_steps), histories)
    return figures


_TELEMETRY_PANELS = {
    "weight-magnitude": (charts.chart_mean_abs_weight, ("mean_abs_weight",)),
    "sign-changes": (charts.chart_sign_changes, ("sign_change_fraction",)),
    "weight-traces": (charts.chart_weight_traces, ("weight_trace",)),
    "gradient-norm": (charts.chart_grad_norm, ("grad_norm",)),
    "l2-distance": (charts.chart_distance, ("l2_to_init", "l2_to_final")),
    "cosine-similarity": (charts.chart_cosine, ("cosine_to_init", "cosine_to_final")),
    "sign-flips-per-step": (charts.chart_sign_flips_per_step, ("sign_flips_per_step",)),
    "distance-per-step": (charts.chart_distance_per_step, ("distance_per_step",)),
}


def _telemetry_figures(runs: Sequence[Run]) -> Figures:
    figures = {}
    for name, (make, needed) in _TELEMETRY_PANELS.items():
        data = _telemetry_of(runs, *needed)
        if data:
            figures[name] = _both(make, data)
    return figures


def _layer_figures(runs: Sequence[Run]) -> Figures:
    variables = list(dict.fromkeys(
        v for r in runs if r.telemetry is not None for v in r.telemetry.data_vars
        if str(v).endswith("_by_layer")))
    figures = {}
    for var in variables:
        data = _telemetry_of(runs, var)
        figures[var.removesuffix("_by_layer").replace("_", "-") + "-by-layer"] = _both(
            lambda d, log_steps, v=var: charts.chart_by_layer(d, v, log_steps=log_steps),
            data, stack=len(data) > 1)
    return figures


_DRAWN_HERE = ("telemetry", "evaluate")  # results the sections above already draw


def _registered_figures(runs: Sequence[Run]) -> Figures:
    """The own chart of every other stored result whose analysis defines one."""
    from ckpt_tools.analyses import registry

    figures = {}
    for r in runs:
        for found in list_results(r.path):
            name = found["analysis"]
            if found["group"] != r.group or name in _DRAWN_HERE or name not in registry.ANALYSES:
                continue
            chart = registry.chart(name, read_result(r.path, name, group=r.group))
            if chart is not None:
                figures[name if len(runs) == 1 else f"{name}-{r.name}"] = chart
    return figures


SECTIONS: list[Section] = [
    Section("Accuracy and loss", _training_figures,
            "Training loss of each update's minibatch; test metrics recorded during "
            "training, and from post-hoc evaluation of the stored weights where present."),
    Section("Telemetry", _telemetry_figures,
            "Whole-network measurements over the analysed weights (see docs/analyses.md)."),
    Section("Per layer", _layer_figures,
            "The same measurements for each layer, coloured from input to output."),
    Section("Other analyses", _registered_figures,
            "Charts of the other results `ckpt analyze` stored in each store."),
    Section("IMP with rewinding", imp_charts.imp_section,
            "Final test accuracy of the sparse networks IMP finds when the survivors are "
            "rewound to step k, by fraction of weights remaining (mean over seeds, bootstrap "
            "95% interval; `ckpt imp`, docs/experiments.md); dashed: the dense run."),
    Section("Instability (linear mode connectivity)", imp_charts.instability_section,
            "Two copies trained from step k with different data orders: test error along "
            "the straight line between them, and its barrier as a function of k (mean over "
            "seed pairs; `ckpt instability`)."),
    Section("Ablations at step k", ablation_charts.ablation_section,
            "Final test accuracy (mean over seeds, bootstrap 95% interval) of IMP "
            "sub-networks started from ablated weights at step k (`ckpt ablate`; "
            "docs/experiments.md); dashed: the dense run."),
    Section("Pre-training before IMP", ablation_charts.pretraining_section,
            "Final test accuracy of the sparse networks of IMP rewound to pre-trained "
            "weights, by pre-training steps (`ckpt pretrain`); dashed: IMP from the run."),
]


def _last(ds: xr.Dataset | None, var: str) -> float:
    if ds is None or var not in ds or ds[var].size == 0:
        return float("nan")
    values = np.asarray(ds[var].values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else float("nan")


def _first(ds: xr.Dataset | None, var: str) -> float:
    if ds is None or var not in ds or ds[var].size == 0:
        return float("nan")
    return float(np.asarray(ds[var].values, dtype=np.float64)[0])


def summary_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: what was trained, what is stored, and the final telemetry.

    Columns: run, model, dataset, group, steps recorded, first/last step, parameters,
    final test accuracy (fraction; post-hoc evaluation if there is one, else the last
    evaluation recorded during training), store size (bytes), compression (raw bytes /
    stored bytes of the history's weights), and the last step's sign-change fraction,
    L2 distance and cosine similarity to init, and mean |w| at the first and last steps.
    """
    rows = []
    for r in runs:
        group = next(g for g in r.info["groups"] if g["group"] == r.group)
        config = group.get("config") or {}
        accuracy = _last(r.evaluation, "test_accuracy")
        if not np.isfinite(accuracy):
            accuracy = _last(r.history, "test_accuracy")
        t = r.telemetry
        rows.append({
            "run": r.name,
            "model": config.get("model", "-"),
            "dataset": config.get("dataset", "-"),
            "group": r.group,
            "steps recorded": group["steps"],
            "first step": group["first_step"],
            "last step": group["last_step"],
            "parameters": group["parameters"],
            "final test accuracy": accuracy,
            "store size (bytes)": r.info["size_on_disk"],
            "compression (raw/stored)": 1 / group["ratio"] if group["ratio"] else np.nan,
            "sign changes at end": _last(t, "sign_change_fraction"),
            "L2 to init at end": _last(t, "l2_to_init"),
            "cosine to init at end": _last(t, "cosine_to_init"),
            "mean |w| at start": _first(t, "mean_abs_weight"),
            "mean |w| at end": _last(t, "mean_abs_weight"),
        })
    return pd.DataFrame(rows)


def build_report(
    runs: Sequence[Run],
    *,
    sections: Sequence[Section] | None = None,
    title: str | None = None,
) -> Report:
    """Every section's figures for `runs` (sections without data are left out)."""
    sections = SECTIONS if sections is None else sections
    built = [(s, figs) for s in sections if (figs := s.figures(runs))]
    title = title or "ckpt-tools report: " + ", ".join(r.name for r in runs)
    return Report(title=title, summary=summary_table(runs), sections=built)
