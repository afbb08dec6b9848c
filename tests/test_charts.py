"""Charts of the telemetry panels: they build, serialise, render, and show the right data."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import altair as alt
import numpy as np
import pytest
import vl_convert
import xarray as xr

from ckpt_tools import open_history
from ckpt_tools.analyses import telemetry
from ckpt_tools.analyses.report import charts

STEP_PANELS = [
    charts.chart_mean_abs_weight,
    charts.chart_sign_changes,
    charts.chart_grad_norm,
    charts.chart_distance,
    charts.chart_cosine,
    charts.chart_sign_flips_per_step,
    charts.chart_distance_per_step,
    charts.chart_weight_traces,
]


@pytest.fixture(scope="module")
def history(tiny_run) -> xr.Dataset:
    return open_history(tiny_run).load()


@pytest.fixture(scope="module")
def tele(tiny_run) -> xr.Dataset:
    return telemetry.compute(tiny_run).load()


def rows(chart: alt.TopLevelMixin) -> list[dict]:
    """Every plotted point of a chart, one dict each.

    Altair gathers inline data under the top-level `datasets`; each record there is one
    line, with arrays `step` and `value` that the chart flattens into points.
    """
    spec = chart.to_dict()
    assert {"flatten": ["step", "value"]} in transforms(spec)
    out = []
    for records in spec.get("datasets", {}).values():
        for record in records:
            assert len(record["step"]) == len(record["value"])
            for step, value in zip(record["step"], record["value"], strict=True):
                out.append({**record, "step": step, "value": value})
    return out


def transforms(spec: dict) -> list[dict]:
    found = list(spec.get("transform", []))
    for key in ("layer", "hconcat", "vconcat"):
        for sub in spec.get(key, []):
            found += transforms(sub)
    if "spec" in spec:
        found += transforms(spec["spec"])
    return found


def encodings(spec: dict) -> list[dict]:
    """The `encoding` blocks of a spec and of its layers/facets."""
    found = [spec["encoding"]] if "encoding" in spec else []
    for key in ("layer", "hconcat", "vconcat"):
        for sub in spec.get(key, []):
            found += encodings(sub)
    if "spec" in spec:
        found += encodings(spec["spec"])
    return found


@pytest.mark.parametrize("make", STEP_PANELS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("log_steps", [False, True])
def test_panels_build_serialise_and_overlay_runs(make, log_steps, tele):
    one = make(tele, log_steps=log_steps)
    two = make({"a": tele, "b": tele}, log_steps=log_steps)
    for chart in (one, two):
        json.dumps(chart.to_dict())  # validates against the Vega-Lite schema too
    x = encodings(one.to_dict())[0]["x"]
    assert x["field"] == ("step_plus_1" if log_steps else "step")
    assert x.get("scale", {}).get("type") == ("log" if log_steps else None)
    assert "log scale" in x["title"] if log_steps else "step" in x["title"]
    color = encodings(two.to_dict())[0]["color"]
    assert color["field"] == "run" and color["scale"]["domain"] == ["a", "b"]
    assert {r["run"] for r in rows(two)} == {"a", "b"}
    assert len(rows(two)) == 2 * len(rows(one))


@pytest.mark.parametrize(("make", "variable"), [
    (charts.chart_sign_changes, "sign_change_fraction"),
    (charts.chart_mean_abs_weight, "mean_abs_weight"),
    (charts.chart_grad_norm, "grad_norm"),
])
def test_plotted_values_are_the_telemetry(make, variable, tele):
    got = {r["step"]: r["value"] for r in rows(make(tele))}
    want = tele[variable].to_series().dropna()
    assert sorted(got) == [int(s) for s in want.index]
    np.testing.assert_allclose([got[int(s)] for s in want.index], want.values, rtol=1e-5)


def test_distance_chart_has_both_references_per_step(tele):
    data = rows(charts.chart_distance(tele))
    for var, label in (("l2_to_init", "to init (step 0)"), ("l2_to_final", "to final (last step)")):
        got = [r["value"] for r in data if r["series"] == label]
        np.testing.assert_allclose(got, tele[var].values, rtol=1e-5)


def test_weight_traces_draw_ten_weights(tele):
    data = rows(charts.chart_weight_traces(tele))
    assert tele.sizes["trace"] >= 10
    assert len({r["trace"] for r in data}) == 10
    assert len(data) == 10 * tele.sizes["step"]
    first = [r["value"] for r in data if r["trace"] == data[0]["trace"]]
    np.testing.assert_allclose(first, tele["weight_trace"].isel(trace=0).values, rtol=1e-5)


def test_by_layer_one_line_per_layer_and_a_facet_per_run(tele):
    var = next(v for v in tele.data_vars if str(v).endswith("_by_layer"))
    one = charts.chart_by_layer(tele, var)
    assert {r["layer"] for r in rows(one)} == {str(x) for x in tele["layer"].values}
    two = charts.chart_by_layer({"a": tele, "b": tele}, var, log_steps=True)
    spec = two.to_dict()
    assert spec["facet"]["column"]["field"] == "run"


def test_by_layer_of_different_architectures_is_coloured_by_depth(tele):
    other = tele.isel(layer=[0, 1, 2])
    spec = charts.chart_by_layer({"a": tele, "b": other}, "mean_abs_weight_by_layer").to_dict()
    assert encodings(spec)[0]["color"]["field"] == "depth"
    depths = {(r["run"], r["layer"]): r["depth"] for r in rows(
        charts.chart_by_layer({"a": tele, "b": other}, "mean_abs_weight_by_layer"))}
    assert depths["b", str(other["layer"].values[0])] == 0
    assert depths["b", str(other["layer"].values[-1])] == 1
    assert depths["a", str(tele["layer"].values[-1])] == 1


def test_log_axes_leave_out_zeros():
    ds = xr.Dataset({"sign_flips_per_step": ("step", [np.nan, 0.01, 0.0, 0.002])},
                    coords={"step": [0, 1, 2, 4]})
    spec = charts.chart_sign_flips_per_step(ds).to_dict()
    assert encodings(spec)[0]["y"]["scale"]["type"] == "log"
    assert [(r["step"], r["value"]) for r in rows(charts.chart_sign_flips_per_step(ds))] == [
        (1, 0.01), (4, 0.002)]


def test_loss_and_accuracy_with_post_hoc_evaluation(history):
    posthoc = xr.Dataset(
        {"test_accuracy": ("step", [0.1, 0.5, 0.9]), "test_loss": ("step", [2.0, 1.0, 0.5])},
        coords={"step": [0, 10, 40]},
    )
    acc = rows(charts.chart_accuracy(history, evaluations={"run": posthoc}))
    series = {r["series"] for r in acc}
    assert series == {"test (during training)", "test (post-hoc)"}
    assert [r["value"] for r in acc if r["series"] == "test (post-hoc)"] == [0.1, 0.5, 0.9]
    recorded = [r["value"] for r in acc if r["series"] == "test (during training)"]
    np.testing.assert_allclose(recorded, history["test_accuracy"].values, rtol=1e-5)
    loss = rows(charts.chart_loss({"a": history, "b": history}))
    train = [r for r in loss if r["series"] == "train (minibatch)" and r["run"] == "a"]
    finite = history["loss"].to_series().dropna()  # step 0 has no update, hence no loss
    assert [r["step"] for r in train] == [int(s) for s in finite.index]


def test_long_series_are_thinned_keeping_first_and_last():
    steps = np.arange(5000)
    ds = xr.Dataset({"sign_change_fraction": ("step", steps / 5000)}, coords={"step": steps})
    data = rows(charts.chart_sign_changes(ds))
    assert len(data) <= charts.MAX_POINTS
    assert data[0]["step"] == 0 and data[-1]["step"] == 4999


def test_charts_do_not_mutate_their_inputs(tele, history):
    before_t, before_h = tele.copy(deep=True), history.copy(deep=True)
    for make in STEP_PANELS:
        make({"a": tele, "b": tele}, log_steps=True).to_dict()
    charts.chart_loss(history).to_dict()
    charts.chart_accuracy(history).to_dict()
    xr.testing.assert_identical(tele, before_t)
    xr.testing.assert_identical(history, before_h)


def test_two_run_chart_renders_to_svg(tele):
    svg = vl_convert.vegalite_to_svg(charts.chart_cosine({"a": tele, "b": tele}).to_dict())
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert "cosine similarity" in svg
