"""Charts of the ablations at step k and of pre-training before IMP: presentation only.

Every ``chart_*`` function takes a summary already reduced over seeds by
`ckpt_tools.analyses.stats.summarize` (a ``statistic`` dimension holding ``mean``,
``low``, ``high``: the mean and its interval, Student t by default; tooltips give n and
the method) and draws the mean as points and
lines and the interval as error bars. Inputs are only read. `figures` turns the reduced
summaries of one store into named figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import xarray as xr

from ckpt_tools.analyses.report._chartdata import json_value

__all__ = [
    "NOISE_KINDS",
    "PERMUTATION_KINDS",
    "SIGN_MAGNITUDE_KINDS",
    "chart_ablation_panel",
    "chart_noise",
    "chart_pretraining",
    "figures",
]

SIGN_MAGNITUDE_KINDS = (
    "signs_k_mags_k", "signs_k_mags_0", "signs_0_mags_k", "signs_0_mags_0", "signs_k_mags_init",
)
PERMUTATION_KINDS = (
    "signs_k_mags_k", "permute_layer", "permute_layer_signs", "permute_filter",
    "permute_filter_signs", "permute_kernel", "permute_kernel_signs",
)
DISTRIBUTION_KINDS = ("signs_k_mags_k", "gaussian", "gaussian_signs", "random_reinit",
                      "random_mask", "signs_0_mags_0")
NOISE_KINDS = ("noise", "noise_norm_matched")  # drawn against alpha; as ablate.NOISE_KINDS
_NOISE_LABELS = {"noise": "", "noise_norm_matched": ", norm-matched"}
WIDTH, HEIGHT = 320, 220
ACCURACY = alt.Scale(zero=False)


def _rows(summary: xr.Dataset, var: str, keep: Sequence[str]) -> list[dict]:
    """One row per cell of ``summary[var]`` with its mean, low and high."""
    ds = summary[var].to_dataset(dim="statistic")  # coordinates come along as columns
    for name in keep:
        if name not in ds.variables:
            ds[name] = summary[name]
    if f"{var}_count" in summary:
        ds["n"] = summary[f"{var}_count"]  # how many seeds each point averages
    table = ds.to_dataframe().reset_index()
    table = table[np.isfinite(table["mean"])]
    if "interval" in summary[var].attrs:
        attrs = summary[var].attrs
        table["interval"] = f"{attrs['interval']} {float(attrs.get('confidence', 0.95)):.0%}"
    return [{k: json_value(v) for k, v in row.items()} for row in table.to_dict("records")]


def _tooltip(rows: list[dict]) -> list[alt.Tooltip]:
    if not rows:
        return []
    return [alt.Tooltip(f"{k}:{'Q' if isinstance(v, int | float) else 'N'}")
            for k, v in rows[0].items()]


def _points(rows: list[dict], x: alt.X, color: str, title: str, y_title: str) -> alt.Chart:
    base = alt.Chart(alt.InlineData(values=rows), title=title).properties(
        width=WIDTH, height=HEIGHT
    )
    y = alt.Y("mean:Q", title=y_title, scale=ACCURACY)
    lines = base.mark_line(point=True).encode(x=x, y=y, color=alt.Color(f"{color}:N"),
                                              tooltip=_tooltip(rows))
    bars = base.mark_errorbar().encode(x=x, y=alt.Y("low:Q", title=y_title), y2="high:Q",
                                       color=alt.Color(f"{color}:N"))
    return lines + bars


def _imp_curves(references: xr.Dataset | None, k: int) -> alt.Chart | None:
    """IMP rewound to `k` and to 0 (levels >= 1), dashed: where ablations of k stand."""
    if references is None:
        return None
    rows = []
    for rewind in dict.fromkeys((int(k), 0)):
        if rewind not in references.rewind_step.values:
            continue
        ref = references.sel(rewind_step=rewind, statistic="mean")
        for level in references.level.values[1:]:
            acc, rem = (float(ref[v].sel(level=level)) for v in ("test_accuracy", "remaining"))
            if np.isfinite(acc) and np.isfinite(rem):
                rows.append({"reference": f"IMP rewind to {rewind}", "remaining_mean": rem,
                             "mean": acc, "level": int(level)})
    if not rows:
        return None
    return alt.Chart(alt.InlineData(values=rows)).mark_line(
        point=alt.OverlayMarkDef(color="gray", filled=False, size=70), strokeDash=[4, 4],
        color="gray").encode(
        x="remaining_mean:Q", y="mean:Q", detail="reference:N",
        shape=alt.Shape("reference:N", title="reference"),
        tooltip=["reference:N", "level:Q", "remaining_mean:Q", "mean:Q"])


def chart_ablation_panel(
    summary: xr.Dataset, kinds: Sequence[str], *, title: str, dense_accuracy: float | None = None,
    references: xr.Dataset | None = None,
) -> alt.TopLevelMixin:
    """Test accuracy vs fraction of weights remaining (log axis) for some ablation kinds.

    Args:
        summary: `ablation_summary` reduced over seeds (dims kind, rewind_step, level,
            statistic; ``remaining`` reduced too).
        kinds: Which conditions to draw (those absent are skipped).
        title: Chart title.
        dense_accuracy: Drawn as a dashed rule (the dense run's final accuracy).
        references: The IMP summary reduced over seeds: IMP rewound to each panel's k and
            to 0 are drawn as dashed gray curves (mean accuracy per level), the two ends
            that an ablation of the weights at k falls between.

    Returns:
        One panel per rewind step, side by side.
    """
    present = [k for k in kinds if k in summary.kind.values]
    sub = summary.sel(kind=present)
    remaining = sub["remaining"].sel(statistic="mean", drop=True)
    rows = _rows(sub.assign(remaining_mean=remaining), "test_accuracy", ["remaining_mean"])
    x = alt.X("remaining_mean:Q", title="weights remaining (log)",
              scale=alt.Scale(type="log", nice=False), axis=alt.Axis(format=".3~%"))
    panels = []
    for k in sub.rewind_step.values:
        these = [r for r in rows if r["rewind_step"] == k]
        chart = _points(these, x, "kind", f"{title}, rewind to step {k}", "test accuracy")
        if dense_accuracy is not None and np.isfinite(dense_accuracy):
            rule = alt.Chart(alt.InlineData(values=[{"dense": dense_accuracy}])).mark_rule(
                strokeDash=[4, 4], color="gray").encode(y="dense:Q")
            chart = chart + rule
        curves = _imp_curves(references, k)
        if curves is not None:
            chart = chart + curves
        panels.append(chart)
    return alt.hconcat(*panels) if len(panels) > 1 else panels[0]


def chart_noise(summary: xr.Dataset, *, references: xr.Dataset | None = None) -> alt.Chart:
    """Test accuracy vs noise scale alpha, one line per (noise kind, rewind step, level).

    Args:
        summary: `ablation_summary` reduced over seeds; the `NOISE_KINDS` conditions
            (``noise_alpha_<a>``, ``noise_norm_matched_alpha_<a>``) are drawn at their
            alpha and ``signs_k_mags_k`` (no noise) at 0, the start of every line.
        references: The IMP summary reduced over seeds: where ``signs_k_mags_k`` was not
            run, IMP rewound to k at the same level (the same network) is drawn at 0.
    """
    alpha = summary["alpha"].values.copy()
    alpha[summary.kind.values == "signs_k_mags_k"] = 0.0
    keep = np.isfinite(alpha)
    sub = summary.isel(kind=np.flatnonzero(keep)).assign_coords(alpha=("kind", alpha[keep]))
    rows = _rows(sub, "test_accuracy", ["alpha"])
    have_zero = {(r["rewind_step"], r["level"]) for r in rows if r["alpha"] == 0.0}
    if references is not None:
        for k, level in sorted({(r["rewind_step"], r["level"]) for r in rows} - have_zero):
            if k in references.rewind_step.values and level in references.level.values:
                ref = references["test_accuracy"].sel(rewind_step=k, level=level)
                stats = {s: float(ref.sel(statistic=s)) for s in ("mean", "low", "high")}
                if np.isfinite(stats["mean"]):
                    rows.append({"kind": "IMP (rewinding)", "rewind_step": k, "level": level,
                                 "alpha": 0.0, **stats})
    noisy = [{**r, "noise": _noise_kind(r["kind"])} for r in rows if r["alpha"] != 0.0]
    kinds = sorted({r["noise"] for r in noisy}) or ["noise"]
    lines = noisy + [{**r, "noise": n} for r in rows if r["alpha"] == 0.0 for n in kinds]
    for row in lines:  # one line per noise kind, each starting from the same alpha = 0
        row["run"] = (f"rewind {row['rewind_step']}, level {row['level']}"
                      + _NOISE_LABELS[row["noise"]])
    x = alt.X("alpha:Q", title="noise scale alpha (layer standard deviations)")
    return _points(lines, x, "run", "Gaussian noise added at step k", "test accuracy")


def _noise_kind(condition: str) -> str:
    """The noise kind of a condition label (``noise_norm_matched_alpha_1`` -> its kind)."""
    return next(k for k in sorted(NOISE_KINDS, key=len, reverse=True)
                if condition == k or condition.startswith(f"{k}_alpha_"))


def chart_pretraining(summary: xr.Dataset, *, references: xr.Dataset | None = None) -> alt.Chart:
    """Test accuracy of the sparse networks vs pre-training steps, one panel per level.

    Args:
        summary: `pretrain_summary` reduced over seeds.
        references: The IMP summary (``imp/summary``) reduced over seeds: its accuracy
            at each level and rewind step is drawn as a dashed rule, labelled.
    """
    rows = _rows(summary, "test_accuracy", [])
    panels = []
    x = alt.X("pretrain_steps:Q", title="pre-training steps")
    for level in summary.level.values:
        these = [r for r in rows if r["level"] == level]
        if not these:
            continue
        chart = _points(these, x, "task", f"level {level}", "test accuracy")
        if references is not None and level in references.level.values:
            ref = references["test_accuracy"].sel(level=level, statistic="mean")
            marks = [{"accuracy": float(v), "reference": f"IMP rewind to {int(k)}"}
                     for k, v in zip(ref.rewind_step.values, ref.values, strict=True)
                     if np.isfinite(v)]
            if marks:
                rule = alt.Chart(alt.InlineData(values=marks)).mark_rule(strokeDash=[4, 4])
                chart = chart + rule.encode(y="accuracy:Q", strokeDash="reference:N",
                                            tooltip=["reference:N", "accuracy:Q"])
        panels.append(chart)
    return alt.hconcat(*panels).properties(title="IMP after pre-training")


def figures(ablations: xr.Dataset | None, pretraining: xr.Dataset | None,
            imp: xr.Dataset | None) -> dict[str, alt.TopLevelMixin]:
    """The named figures of one store's stored summaries (each already reduced over seeds).

    Args:
        ablations: Reduced `ablation_summary`, or None.
        pretraining: Reduced `pretrain_summary`, or None.
        imp: Reduced IMP summary, or None (its ``dense_test_accuracy`` attribute and
            accuracies serve as references).
    """
    out: dict[str, alt.TopLevelMixin] = {}
    dense = None if imp is None else imp.attrs.get("dense_test_accuracy")
    if ablations is not None:
        for name, kinds, title in (
            ("sign-magnitude", SIGN_MAGNITUDE_KINDS, "Signs and magnitudes at k"),
            ("permutation", PERMUTATION_KINDS, "Permuting the weights at k"),
            ("distribution", DISTRIBUTION_KINDS, "Re-initialisation and controls"),
        ):
            if set(kinds[1:]) & set(ablations.kind.values):
                out[name] = chart_ablation_panel(ablations, kinds, title=title,
                                                 dense_accuracy=dense, references=imp)
        if any(str(k).startswith(tuple(f"{n}_alpha_" for n in NOISE_KINDS))
               for k in ablations.kind.values):
            out["noise"] = chart_noise(ablations, references=imp)
    if pretraining is not None and np.isfinite(pretraining["test_accuracy"].values).any():
        out["pretraining"] = chart_pretraining(pretraining, references=imp)
    return out
