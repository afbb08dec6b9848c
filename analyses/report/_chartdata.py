"""Shared plumbing of the chart functions: inline data records, step axes, base chart.

Records hold one drawn line each, with the steps and values as arrays; the base chart
flattens them into one row per point, which keeps the inline JSON about five times
smaller than one object per point.
"""

from __future__ import annotations

from collections.abc import Mapping

import altair as alt
import numpy as np
import xarray as xr

__all__ = ["HEIGHT", "LOG_STEP_TITLE", "MAX_POINTS", "STEP_TITLE", "WIDTH", "Runs", "base",
           "records", "runs_of", "step_x"]

Runs = xr.Dataset | Mapping[str, xr.Dataset]

STEP_TITLE = "step (optimizer updates)"
LOG_STEP_TITLE = "step + 1 (optimizer updates, log scale)"
WIDTH, HEIGHT = 340, 210  # pixels of one panel
MAX_POINTS = 1000  # recorded steps kept per series; the paper's schedule has ~550


def json_value(value):
    """A JSON-ready Python value (numpy scalars and string dtypes become int/float/str)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value if isinstance(value, int | float) else str(value)


def runs_of(data: Runs) -> dict[str, xr.Dataset]:
    """``{run name: Dataset}``; a lone Dataset is the run ``"run"``."""
    return {"run": data} if isinstance(data, xr.Dataset) else dict(data)


def _thin(n: int, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` evenly spaced entries of `n`, first and last kept."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max(max_points, 2))).astype(int))


def _short(x: float) -> float:
    return float(f"{x:.6g}")  # six significant digits keep inline JSON small


def records(
    runs: Mapping[str, xr.Dataset],
    variables: Mapping[str, str],
    *,
    extra_dim: str | None = None,
    max_points: int = MAX_POINTS,
    positive: bool = False,
) -> list[dict]:
    """One record per drawn line: ``{run, series[, extra_dim], step: [...], value: [...]}``.

    The arrays keep the inline JSON compact; `base` flattens them into one row per
    point in the chart itself. NaN values (and values <= 0 if `positive`) are dropped.
    `variables` maps a variable name to its series label. A variable's step dimension
    is its one dimension other than `extra_dim` (``step``, ``eval_step``, ...); its
    coordinate values become ``step``. `extra_dim` names a second dimension (``layer``,
    ``trace``): one record per entry, labelled in a field of the same name.
    """
    records = []
    for run, ds in runs.items():
        for var, label in variables.items():
            if var not in ds:
                continue
            da = ds[var]
            dim = next(d for d in da.dims if d != extra_dim)
            da = da.isel({dim: _thin(da.sizes[dim], max_points)})
            steps = np.asarray(da[dim].values, dtype=np.int64)
            if extra_dim is None:
                columns = {None: np.asarray(da.values, dtype=np.float64)}
            else:
                values = np.asarray(da.transpose(dim, extra_dim).values, dtype=np.float64)
                labels = ([str(x) for x in da[extra_dim].values] if extra_dim in da.coords
                          else [str(i) for i in range(da.sizes[extra_dim])])
                columns = {lab: values[:, j] for j, lab in enumerate(labels)}
            for extra, values in columns.items():
                keep = np.isfinite(values) & ((values > 0) if positive else True)
                if not keep.any():
                    continue
                record = {"run": run, "series": label}
                if extra_dim is not None:
                    record[extra_dim] = extra
                record["step"] = [int(x) for x in steps[keep]]
                record["value"] = [_short(x) for x in values[keep]]
                records.append(record)
    return records


def step_x(log_steps: bool) -> alt.X:
    """The step axis: linear on ``step``, or logarithmic on ``step + 1``."""
    if log_steps:
        return alt.X("step_plus_1:Q", title=LOG_STEP_TITLE,
                     scale=alt.Scale(type="log", nice=False))
    return alt.X("step:Q", title=STEP_TITLE)


def base(rows: list[dict], title: str, log_steps: bool) -> alt.Chart:
    """A panel-sized chart of `rows` (from `records`), one row per point."""
    chart = alt.Chart(alt.InlineData(values=rows), title=title or alt.Undefined).properties(
        width=WIDTH, height=HEIGHT
    ).transform_flatten(["step", "value"])
    return chart.transform_calculate(step_plus_1="datum.step + 1") if log_steps else chart
