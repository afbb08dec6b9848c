"""Altair charts of the telemetry panels: presentation only, nothing is computed here.

Every ``chart_*`` function takes one run (an `xarray.Dataset`) or several runs (a
mapping ``{run name: Dataset}``, overlaid and coloured by run name) and returns an Altair
chart with its data inline; inputs are only read. Step axes are linear, or logarithmic
with ``log_steps=True``: a log axis cannot show step 0 (the initialisation), so it plots
``step + 1`` and says so in the axis title. Series longer than ``max_points`` steps are
thinned to that many evenly spaced recorded steps (first and last kept), so an embedded
chart stays small.

`training_figures`, `telemetry_figures` and `layer_figures` draw every panel their data
allows, each on a linear and a logarithmic step axis, as named figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import altair as alt
import xarray as xr

from ckpt_tools.analyses.report._chartdata import (
    MAX_POINTS,
    STEP_TITLE,
    WIDTH,
    Runs,
    base,
    records,
    runs_of,
    step_x,
)

__all__ = [
    "LAYER_AXES",
    "TELEMETRY_PANELS",
    "MAX_POINTS",
    "STEP_TITLE",
    "chart_accuracy",
    "chart_by_layer",
    "chart_cosine",
    "chart_distance",
    "chart_distance_per_step",
    "chart_grad_norm",
    "chart_loss",
    "chart_mean_abs_weight",
    "chart_metric",
    "chart_sign_changes",
    "chart_sign_flips_per_step",
    "chart_weight_traces",
    "layer_figures",
    "telemetry_figures",
    "training_figures",
]

def chart_metric(
    data: Runs,
    variables: Mapping[str, str],
    *,
    title: str,
    y_title: str,
    series_title: str = "series",
    log_steps: bool = False,
    y_format: str | None = None,
    y_log: bool = False,
    max_points: int = MAX_POINTS,
) -> alt.Chart:
    """Lines of one or more per-step variables of one or several runs.

    Args:
        data: a Dataset, or ``{run name: Dataset}``, holding `variables` on one step
            dimension each (``step``, or ``eval_step`` for the sparse evaluations, which
            are drawn with a point at each value).
        variables: ``{variable name: series label}``; absent variables are skipped.
        title: chart title.
        y_title: y axis title, with units.
        series_title: legend title of the series labels.
        log_steps: logarithmic step axis (plots ``step + 1``).
        y_format: d3 format of the y axis labels (e.g. ``".0%"``).
        y_log: logarithmic y axis; values <= 0 are left out.
        max_points: most recorded steps drawn per series.

    Returns:
        A line chart: colour by series for one run; by run (dashes by series) for several.
    """
    runs = runs_of(data)
    # a log axis cannot place zero (e.g. no sign flipped between two recorded steps)
    rows = records(runs, variables, max_points=max_points, positive=y_log)
    present = list(dict.fromkeys(r["series"] for r in rows))
    several_runs, several_series = len(runs) > 1, len(present) > 1
    y_scale = alt.Scale(type="log") if y_log else alt.Scale(zero=False)
    encoding = {
        "x": step_x(log_steps),
        "y": alt.Y("value:Q", title=y_title, scale=y_scale, axis=alt.Axis(format=y_format)
                   if y_format else alt.Axis()),
        "tooltip": [alt.Tooltip("run:N"), alt.Tooltip("step:Q"),
                    alt.Tooltip("series:N", title=series_title),
                    alt.Tooltip("value:Q", format=".4g")],
    }
    series = alt.Color("series:N", title=series_title, sort=present)
    if several_runs:
        encoding["color"] = alt.Color("run:N", title="run", scale=alt.Scale(domain=list(runs)))
        if several_series:
            encoding["strokeDash"] = alt.StrokeDash(
                "series:N", title=series_title, sort=present)
    elif several_series:
        encoding["color"] = series
    lines = base(rows, title, log_steps).mark_line(strokeWidth=1.5, clip=True).encode(
        **encoding
    )
    sparse = sorted({label for ds in runs.values() for v, label in variables.items()
                     if v in ds and ds[v].dims != ("step",)})
    if not sparse:
        return lines
    point_encoding = {k: v for k, v in encoding.items() if k != "strokeDash"}  # one legend
    points = base(rows, title, log_steps).mark_point(filled=True, size=30, clip=True).encode(
        **point_encoding).transform_filter(alt.FieldOneOfPredicate(field="series", oneOf=sparse))
    return alt.layer(lines, points)


def _with_evaluations(
    histories: Mapping[str, xr.Dataset], evaluations: Mapping[str, xr.Dataset] | None, var: str
) -> dict[str, xr.Dataset]:
    """Each history's `var`s with the post-hoc evaluation's `var` alongside as ``posthoc``."""
    out = {}
    for run, ds in histories.items():
        merged = ds[[v for v in ("loss", var) if v in ds]]
        ev = (evaluations or {}).get(run)
        if ev is not None and var in ev and ev[var].ndim == 1:
            da = ev[var]
            da = da.rename({da.dims[0]: "posthoc_step"}).reset_coords(drop=True)
            merged = merged.assign(posthoc=da)
        out[run] = merged
    return out


def chart_loss(
    histories: Runs,
    *,
    evaluations: Mapping[str, xr.Dataset] | None = None,
    log_steps: bool = False,
    max_points: int = MAX_POINTS,
) -> alt.Chart:
    """Training loss (minibatch of each update), test loss, and post-hoc test loss (log y).

    Args:
        histories: recorded histories with ``loss (step)`` and ``test_loss (eval_step)``.
        evaluations: optional ``{run name: Dataset}`` with a post-hoc ``test_loss`` on one
            step dimension, drawn as its own series.
        log_steps: logarithmic step axis.
        max_points: most recorded steps drawn per series.
    """
    runs = _with_evaluations(runs_of(histories), evaluations, "test_loss")
    return chart_metric(
        runs,
        {"loss": "train (minibatch)", "test_loss": "test (during training)",
         "posthoc": "test (post-hoc)"},
        title="Loss", y_title="cross-entropy loss (nats, log scale)", series_title="split",
        y_log=True, log_steps=log_steps, max_points=max_points,
    )


def chart_accuracy(
    histories: Runs,
    *,
    evaluations: Mapping[str, xr.Dataset] | None = None,
    log_steps: bool = False,
    max_points: int = MAX_POINTS,
) -> alt.Chart:
    """Test accuracy recorded during training, and from post-hoc evaluation if given."""
    runs = _with_evaluations(runs_of(histories), evaluations, "test_accuracy")
    return chart_metric(
        runs,
        {"test_accuracy": "test (during training)", "posthoc": "test (post-hoc)"},
        title="Test accuracy", y_title="test accuracy (% of examples)", series_title="split",
        y_format=".0%", log_steps=log_steps, max_points=max_points,
    )


def chart_mean_abs_weight(telemetry: Runs, *, log_steps: bool = False) -> alt.Chart:
    """Mean absolute weight over the analysed weights, per step."""
    return chart_metric(telemetry, {"mean_abs_weight": "mean |w|"}, title="Weight magnitude",
                        y_title="mean |weight|", log_steps=log_steps)


def chart_sign_changes(telemetry: Runs, *, log_steps: bool = False) -> alt.Chart:
    """Fraction of weights whose sign differs from step 0."""
    return chart_metric(telemetry, {"sign_change_fraction": "signs changed"},
                        title="Sign changes since initialisation",
                        y_title="weights with sign ≠ step 0 (%)", y_format=".1%",
                        log_steps=log_steps)


def chart_grad_norm(telemetry: Runs, *, log_steps: bool = False) -> alt.Chart:
    """Global gradient L2 norm at each recorded step."""
    return chart_metric(telemetry, {"grad_norm": "gradient norm"}, title="Gradient norm",
                        y_title="gradient L2 norm (all layers)", log_steps=log_steps)


def chart_distance(telemetry: Runs, *, log_steps: bool = False) -> alt.Chart:
    """Euclidean distance of the weights to their initial and final values."""
    return chart_metric(
        telemetry, {"l2_to_init": "to init (step 0)", "l2_to_final": "to final (last step)"},
        title="L2 distance to initial and final weights", y_title="L2 distance (weight units)",
        series_title="reference", log_steps=log_steps,
    )


def chart_cosine(telemetry: Runs, *, log_steps: bool = False) -> alt.Chart:
    """Cosine similarity of the weights to their initial and final values."""
    return chart_metric(
        telemetry,
        {"cosine_to_init": "to init (step 0)", "cosine_to_final": "to final (last step)"},
        title="Cosine similarity to initial and final weights",
        y_title="cosine similarity (1 = same direction)", series_title="reference",
        log_steps=log_steps,
    )


def chart_sign_flips_per_step(telemetry: Runs, *, log_steps: bool = False) -> alt.Chart:
    """Sign flips between consecutive recorded steps, divided by the step gap (log y)."""
    return chart_metric(
        telemetry, {"sign_flips_per_step": "sign flips"},
        title="Sign flips between consecutive recorded steps",
        y_title="weights flipping sign per update (fraction, log)", y_log=True,
        y_format=".0e", log_steps=log_steps,
    )


def chart_distance_per_step(telemetry: Runs, *, log_steps: bool = False) -> alt.Chart:
    """L2 distance between consecutive recorded steps, divided by the step gap (log y)."""
    return chart_metric(
        telemetry, {"distance_per_step": "distance"},
        title="Distance between consecutive recorded steps",
        y_title="L2 distance per update (weight units, log)", y_log=True, log_steps=log_steps,
    )


def _label_traces(ds: xr.Dataset) -> xr.Dataset:
    """A copy whose ``trace`` labels name each weight: ``layer [index along param]``."""
    if "trace_param" not in ds.coords:
        return ds
    params = [int(p) for p in ds["trace_param"].values]
    layers = [str(x) for x in ds["trace_layer"].values] if "trace_layer" in ds.coords else None
    labels = [f"{layers[i]} [{p}]" if layers else f"param {p}" for i, p in enumerate(params)]
    return ds.assign_coords(trace=labels)


def chart_weight_traces(
    telemetry: Runs, *, n: int = 10, log_steps: bool = False, max_points: int = MAX_POINTS
) -> alt.Chart:
    """The values of `n` sampled weights (``weight_trace (step, trace)``) over steps.

    Weights are named by the ``trace_layer`` and ``trace_param`` coordinates if present.
    """
    runs = {run: _label_traces(ds[["weight_trace"]].isel(trace=slice(0, n)))
            for run, ds in runs_of(telemetry).items() if "weight_trace" in ds}
    rows = records(runs, {"weight_trace": "weight"}, extra_dim="trace", max_points=max_points)
    encoding = {
        "x": step_x(log_steps),
        "y": alt.Y("value:Q", title="weight value"),
        "detail": alt.Detail("trace:N"),
        "tooltip": ["run:N", "trace:N", "step:Q", alt.Tooltip("value:Q", format=".4g")],
    }
    if len(runs) > 1:
        encoding["color"] = alt.Color("run:N", title="run", scale=alt.Scale(domain=list(runs)))
    else:
        encoding["color"] = alt.Color("trace:N", title="weight (layer [index along param])")
    return base(rows, f"{n} sampled weights", log_steps).mark_line(strokeWidth=1.2).encode(
        **encoding
    )


LAYER_AXES: dict[str, tuple[str, str | None, bool]] = {
    # telemetry variable: (y axis title, d3 format of its labels, logarithmic)
    "sign_change_fraction": ("weights with sign ≠ step 0 (%)", ".0%", False),
    "mean_abs_weight": ("mean |weight|", None, False),
    "l2_to_init": ("L2 distance to init (weight units)", None, False),
    "l2_to_final": ("L2 distance to final (weight units)", None, False),
    "cosine_to_init": ("cosine similarity to init", None, False),
    "cosine_to_final": ("cosine similarity to final", None, False),
    "grad_norm": ("gradient L2 norm", None, False),
    "sign_flips_per_step": ("sign flips per update (fraction, log)", ".0e", True),
    "distance_per_step": ("L2 distance per update (log)", None, True),
}
"""How `chart_by_layer` draws the y axis of each ``<name>_by_layer`` variable."""


def chart_by_layer(
    telemetry: Runs,
    variable: str,
    *,
    log_steps: bool = False,
    max_points: int = 300,
) -> alt.Chart | alt.FacetChart:
    """A per-layer variable ``(step, layer)``, one line per layer, first layer to last.

    The y axis follows `LAYER_AXES` (log axes leave out values <= 0). Several runs are
    drawn side by side (one facet per run, each with its own step range). Runs with the
    same layers share a legend of layer names; runs of different architectures are
    coloured by relative depth instead (0 = first layer, 1 = last).
    """
    quantity = variable.removesuffix("_by_layer")
    y_title, y_format, y_log = LAYER_AXES.get(quantity, (quantity.replace("_", " "), None, False))
    runs = {run: ds[[variable]] for run, ds in runs_of(telemetry).items() if variable in ds}
    rows = records(runs, {variable: variable}, extra_dim="layer", max_points=max_points,
                    positive=y_log)
    for r in rows:
        del r["series"]  # the variable name, the same on every line
    layers = {run: [str(x) for x in ds["layer"].values] for run, ds in runs.items()}
    order = next(iter(layers.values()), [])
    if all(names == order for names in layers.values()):
        color = alt.Color("layer:O", sort=order, scale=alt.Scale(scheme="viridis"),
                          title="layer (input to output)")
    else:
        depth = {run: {name: i / max(len(names) - 1, 1) for i, name in enumerate(names)}
                 for run, names in layers.items()}
        rows = [{**r, "depth": round(depth[r["run"]][r["layer"]], 4)} for r in rows]
        color = alt.Color("depth:Q", scale=alt.Scale(scheme="viridis"),
                          title="layer depth (0 = input, 1 = output)")
    title = f"{quantity.replace('_', ' ')}, per layer"
    y_scale = alt.Scale(type="log") if y_log else alt.Scale(zero=False)
    chart = base(rows, "" if len(runs) > 1 else title, log_steps).mark_line(
        strokeWidth=1.2).encode(
        x=step_x(log_steps),
        y=alt.Y("value:Q", title=y_title, scale=y_scale,
                axis=alt.Axis(format=y_format) if y_format else alt.Axis()),
        color=color,
        detail=alt.Detail("layer:N"),  # one line per layer, also under a quantitative colour
        tooltip=["run:N", "layer:N", "step:Q", alt.Tooltip("value:Q", format=".4g")],
    )
    if len(runs) > 1:
        return chart.properties(width=WIDTH * 2 // 3).facet(
            column=alt.Column("run:N", title=None), title=title).resolve_scale(x="independent")
    return chart


def _both(make: Callable[..., alt.TopLevelMixin], data, *, stack: bool = False):
    """The same panel on a linear and on a logarithmic step axis, side by side."""
    pair = (make(data, log_steps=False), make(data, log_steps=True))
    return alt.vconcat(*pair) if stack else alt.hconcat(*pair)


def training_figures(
    histories: Mapping[str, xr.Dataset], evaluations: Mapping[str, xr.Dataset]
) -> dict[str, alt.TopLevelMixin]:
    """``loss`` and ``accuracy`` of the runs' histories, with their post-hoc evaluations.

    Args:
        histories: ``{run name: history}``.
        evaluations: ``{run name: stored evaluation}`` for the runs that have one.
    """
    figures = {}
    if any("loss" in h or "test_loss" in h for h in histories.values()):
        figures["loss"] = _both(
            lambda d, log_steps: chart_loss(d, evaluations=evaluations, log_steps=log_steps),
            histories)
    if any("test_accuracy" in h for h in histories.values()) or any(
            "test_accuracy" in e for e in evaluations.values()):
        figures["accuracy"] = _both(
            lambda d, log_steps: chart_accuracy(d, evaluations=evaluations,
                                                log_steps=log_steps), histories)
    return figures


TELEMETRY_PANELS = {  # figure name: (chart, variables it needs)
    "weight-magnitude": (chart_mean_abs_weight, ("mean_abs_weight",)),
    "sign-changes": (chart_sign_changes, ("sign_change_fraction",)),
    "weight-traces": (chart_weight_traces, ("weight_trace",)),
    "gradient-norm": (chart_grad_norm, ("grad_norm",)),
    "l2-distance": (chart_distance, ("l2_to_init", "l2_to_final")),
    "cosine-similarity": (chart_cosine, ("cosine_to_init", "cosine_to_final")),
    "sign-flips-per-step": (chart_sign_flips_per_step, ("sign_flips_per_step",)),
    "distance-per-step": (chart_distance_per_step, ("distance_per_step",)),
}


def _having(telemetry: Mapping[str, xr.Dataset], *needed: str) -> dict[str, xr.Dataset]:
    return {name: t for name, t in telemetry.items() if all(v in t for v in needed)}


def telemetry_figures(telemetry: Mapping[str, xr.Dataset]) -> dict[str, alt.TopLevelMixin]:
    """Every whole-network telemetry panel that some run's telemetry holds."""
    figures = {}
    for name, (make, needed) in TELEMETRY_PANELS.items():
        data = _having(telemetry, *needed)
        if data:
            figures[name] = _both(make, data)
    return figures


def layer_figures(telemetry: Mapping[str, xr.Dataset]) -> dict[str, alt.TopLevelMixin]:
    """One ``<name>-by-layer`` figure per ``<name>_by_layer`` telemetry variable."""
    variables = list(dict.fromkeys(
        v for t in telemetry.values() for v in t.data_vars if str(v).endswith("_by_layer")))
    figures = {}
    for var in variables:
        data = _having(telemetry, var)
        figures[var.removesuffix("_by_layer").replace("_", "-") + "-by-layer"] = _both(
            lambda d, log_steps, v=var: chart_by_layer(d, v, log_steps=log_steps),
            data, stack=len(data) > 1)
    return figures
