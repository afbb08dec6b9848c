"""Charts of IMP with rewinding and of the instability analysis: presentation only.

The ``chart_*`` functions take results already reduced over seeds (IMP) or seed pairs
(instability) by `ckpt_tools.analyses.stats.summarize`: a ``statistic`` dimension holding
``mean``, ``low`` and ``high`` (the mean and its 95% interval, Student t unless the
summary says otherwise), drawn as lines with points and error bars; each point's tooltip
gives its n and the interval's method. Inputs are only read; `ckpt_tools.analyses.report.read`
loads and reduces the stored results.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import xarray as xr

from ckpt_tools.analyses.report._chartdata import json_value

__all__ = [
    "chart_imp",
    "chart_instability",
    "chart_interpolation",
]

WIDTH, HEIGHT = 360, 240


def _rows(reduced: xr.Dataset, var: str, extra: dict[str, xr.DataArray]) -> list[dict]:
    ds = reduced[var].to_dataset(dim="statistic")
    for name, values in extra.items():
        ds[name] = values
    if f"{var}_count" in reduced:
        ds["n"] = reduced[f"{var}_count"]  # how many seeds (or pairs) each point averages
    table = ds.to_dataframe().reset_index()
    table = table[np.isfinite(table["mean"])]
    if "interval" in reduced[var].attrs:
        table["interval"] = _interval(reduced[var].attrs)
    return [{k: json_value(v) for k, v in row.items()} for row in table.to_dict("records")]


def _interval(attrs: dict) -> str:
    """How the error bars were made, e.g. ``"Student t 95%"``."""
    return f"{attrs['interval']} {float(attrs.get('confidence', 0.95)):.0%}"


def _with_bars(rows: list[dict], x: alt.X, y_title: str, color: str, title: str) -> alt.Chart:
    base = alt.Chart(alt.InlineData(values=rows), title=title).properties(
        width=WIDTH, height=HEIGHT)
    colour = alt.Color(f"{color}:N", title=color.replace("_", " "))
    y = alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False))
    tooltip = [alt.Tooltip(f"{k}:{'Q' if isinstance(v, int | float) else 'N'}")
               for k, v in (rows[0].items() if rows else ())]
    lines = base.mark_line(point=True).encode(x=x, y=y, color=colour, tooltip=tooltip)
    bars = base.mark_errorbar().encode(x=x, y=alt.Y("low:Q", title=y_title), y2="high:Q",
                                       color=colour)
    return lines + bars


def chart_imp(reduced: xr.Dataset, *, dense_accuracy: float | None = None) -> alt.Chart:
    """Test accuracy vs fraction of weights remaining (log axis), one line per rewind step.

    Args:
        reduced: The IMP summary reduced over ``seed`` (dims rewind_step, level, statistic).
        dense_accuracy: The dense run's final accuracy, drawn as a dashed rule.
    """
    remaining = reduced["remaining"].sel(statistic="mean", drop=True)
    rows = _rows(reduced, "test_accuracy", {"remaining": remaining})
    x = alt.X("remaining:Q", title="fraction of weights remaining (log)",
              scale=alt.Scale(type="log", nice=False, reverse=True),
              axis=alt.Axis(format=".3~%"))
    chart = _with_bars(rows, x, "final test accuracy", "rewind_step",
                       "IMP with rewinding: accuracy of the sparse networks")
    if dense_accuracy is not None and np.isfinite(dense_accuracy):
        rule = alt.Chart(alt.InlineData(values=[{"dense": float(dense_accuracy)}])).mark_rule(
            strokeDash=[4, 4], color="gray").encode(y="dense:Q", tooltip=["dense:Q"])
        chart = chart + rule
    return chart


def chart_instability(reduced: xr.Dataset, *, title: str = "Instability") -> alt.Chart:
    """Test error barrier vs the step k the copies started from (symmetric log axis).

    Args:
        reduced: The instability result reduced over ``pair``.
        title: Chart title.
    """
    rows = _rows(reduced, "barrier", {})
    for row in rows:
        row["network"] = title
    x = alt.X("rewind_step:Q", title="rewind step k (symlog)", scale=alt.Scale(type="symlog"))
    return _with_bars(rows, x, "error barrier (max error - mean of ends)", "network",
                      f"{title}: error barrier between two copies trained from k")


def chart_interpolation(reduced: xr.Dataset, *, title: str = "Instability") -> alt.Chart:
    """Test error along the line between the two copies, one line per rewind step."""
    rows = _rows(reduced, "test_error", {})
    x = alt.X("alpha:Q", title="interpolation alpha (0: copy A, 1: copy B)")
    return _with_bars(rows, x, "test error", "rewind_step",
                      f"{title}: test error along the linear path")
