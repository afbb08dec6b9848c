"""The report's sections: each a pure function from the loaded runs to named charts.

`build_report` lays them out; `ckpt_tools.analyses.report.read` loads everything they
draw and `ckpt_tools.analyses.report.page` renders the result. A section returns ``{}``
when its data is absent and is then left out. A new family of figures is one function
here plus one `Section` in `SECTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import altair as alt
import numpy as np
import pandas as pd
import xarray as xr

from ckpt_tools.analyses import registry
from ckpt_tools.analyses.report import ablation_charts, charts, imp_charts
from ckpt_tools.analyses.report.read import Run

__all__ = [
    "SECTIONS",
    "Report",
    "Section",
    "ablation_section",
    "build_report",
    "imp_section",
    "instability_section",
    "pretraining_section",
    "summary_table",
]

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


def _per_store(runs: Sequence[Run], draw: Callable[[Run], Figures]) -> Figures:
    """`draw` for every run, names suffixed by the run's name when there are several."""
    out = {}
    for r in runs:
        for name, chart in draw(r).items():
            out[name if len(runs) == 1 else f"{name}-{r.name}"] = chart
    return out


def _training_figures(runs: Sequence[Run]) -> Figures:
    histories = {r.name: r.history for r in runs}
    evaluations = {r.name: r.evaluation for r in runs if r.evaluation is not None}
    return charts.training_figures(histories, evaluations)


def _telemetry(runs: Sequence[Run]) -> dict[str, xr.Dataset]:
    return {r.name: r.telemetry for r in runs if r.telemetry is not None}


def _telemetry_figures(runs: Sequence[Run]) -> Figures:
    return registry.figures("telemetry", _telemetry(runs))


def _layer_figures(runs: Sequence[Run]) -> Figures:
    return registry.figures("telemetry", _telemetry(runs), layers=True)


def _registered_figures(runs: Sequence[Run]) -> Figures:
    """Every other stored result, drawn by its analysis' own hooks (`registry.figures`)."""
    names = list(dict.fromkeys(name for r in runs for name in r.results))
    return {key: chart for name in names for key, chart in registry.figures(
        name, {r.name: r.results[name] for r in runs if name in r.results}).items()}


def imp_section(runs: Sequence[Run]) -> Figures:
    """The IMP figure of every store that holds an IMP summary; {} if none."""
    def draw(r: Run) -> Figures:
        imp = r.experiments.imp
        if imp is None:
            return {}
        return {"imp": imp_charts.chart_imp(
            imp, dense_accuracy=imp.attrs.get("dense_test_accuracy"))}
    return _per_store(runs, draw)


def instability_section(runs: Sequence[Run]) -> Figures:
    """Barrier vs k and error along the path for every stored instability result."""
    def draw(r: Run) -> Figures:
        out = {}
        for level, reduced in r.experiments.instability.items():
            label = "dense network" if level is None else f"IMP level {level} sub-network"
            suffix = "" if level is None else f"-level-{level}"
            out[f"instability{suffix}"] = imp_charts.chart_instability(reduced, title=label)
            out[f"interpolation{suffix}"] = imp_charts.chart_interpolation(reduced, title=label)
        return out
    return _per_store(runs, draw)


def ablation_section(runs: Sequence[Run]) -> Figures:
    """Figures of the ablations stored in the report's stores (``ckpt ablate``); {} if none."""
    return _per_store(runs, lambda r: ablation_charts.figures(
        r.experiments.ablations, None, r.experiments.imp)
        if r.experiments.ablations is not None else {})


def pretraining_section(runs: Sequence[Run]) -> Figures:
    """Figures of the pre-training experiments stored in the report's stores; {} if none."""
    return _per_store(runs, lambda r: ablation_charts.figures(
        None, r.experiments.pretraining, r.experiments.imp)
        if r.experiments.pretraining is not None else {})


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
    Section("IMP with rewinding", imp_section,
            "Final test accuracy of the sparse networks IMP finds when the survivors are "
            "rewound to step k, by fraction of weights remaining (mean over seeds with its "
            "Student t 95% interval; each point's tooltip gives n; `ckpt imp`, "
            "docs/experiments.md); dashed: the dense run."),
    Section("Instability (linear mode connectivity)", instability_section,
            "Two copies trained from step k with different data orders: test error along "
            "the straight line between them, and its barrier as a function of k (mean over "
            "seed pairs with its Student t 95% interval, n in the tooltip; `ckpt instability`)."),
    Section("Ablations at step k", ablation_section,
            "Final test accuracy (mean over seeds with its Student t 95% interval, n in each "
            "point's tooltip) of IMP "
            "sub-networks started from ablated weights at step k (`ckpt ablate`; "
            "docs/experiments.md); dashed: the dense run."),
    Section("Pre-training before IMP", pretraining_section,
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
