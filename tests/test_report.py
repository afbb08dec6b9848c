"""`ckpt report`: the summary, the self-contained page (checked in a real browser), exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ckpt_tools import open_history
from ckpt_tools.analyses import telemetry
from ckpt_tools.analyses.report import SECTIONS, Section, build_report, load_runs, page
from ckpt_tools.cli.app import app
from ckpt_tools.store import store_info

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TELEMETRY_FIGURES = {
    "weight-magnitude", "sign-changes", "weight-traces", "gradient-norm", "l2-distance",
    "cosine-similarity", "sign-flips-per-step", "distance-per-step",
}
LAYER_FIGURES = {f"{name}-by-layer" for name in (
    "sign-change-fraction", "mean-abs-weight", "l2-to-init", "l2-to-final", "cosine-to-init",
    "cosine-to-final", "grad-norm", "sign-flips-per-step", "distance-per-step")}


@pytest.fixture(scope="module")
def second_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run under another name (overlaying two runs needs two stores)."""
    dst = tmp_path_factory.mktemp("second") / "tiny-again.zarr"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="module")
def one_report(tiny_run):
    return build_report(load_runs([tiny_run]))


@pytest.fixture(scope="module")
def two_page(tiny_run, second_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "two.html"
    page.write_html(build_report(load_runs([tiny_run, second_run])), out)
    return out


def figure_names(report) -> dict[str, set[str]]:
    return {section.title: set(figures) for section, figures in report.sections}


def test_report_has_every_panel(one_report):
    names = figure_names(one_report)
    assert names["Accuracy and loss"] == {"loss", "accuracy"}
    assert names["Telemetry"] == TELEMETRY_FIGURES
    assert names["Per layer"] == LAYER_FIGURES  # one per `<name>_by_layer` variable


def test_summary_table_matches_the_store(tiny_run, one_report):
    row = one_report.summary.iloc[0]
    info = store_info(tiny_run)
    group = info["groups"][0]
    history = open_history(tiny_run)
    tele = telemetry.compute(tiny_run)
    assert row["run"] == "tiny"
    assert (row["model"], row["dataset"]) == ("convnet", "digits")
    assert row["steps recorded"] == history.sizes["step"] == group["steps"]
    assert row["parameters"] == history.sizes["param"]
    assert row["final test accuracy"] == pytest.approx(float(history["test_accuracy"][-1]))
    assert row["store size (bytes)"] == info["size_on_disk"]
    assert row["compression (raw/stored)"] == pytest.approx(
        group["raw_bytes"] / group["stored_bytes"])
    assert row["sign changes at end"] == pytest.approx(float(tele["sign_change_fraction"][-1]))
    assert row["cosine to init at end"] == pytest.approx(float(tele["cosine_to_init"][-1]))


def test_sections_without_data_are_left_out(tiny_run):
    runs = load_runs([tiny_run])
    empty = Section("Nothing here", lambda runs: {})
    extra = Section("Extra", lambda runs: {"again": SECTIONS[0].figures(runs)["loss"]})
    report = build_report(runs, sections=[empty, extra])
    assert [s.title for s, _ in report.sections] == ["Extra"]
    assert "Nothing here" not in page.render_html(report)


def test_stored_results_are_used(tiny_copy, monkeypatch):
    from ckpt_tools.analyses import registry

    stored = registry.run(tiny_copy, "telemetry")
    evaluation = registry.run(tiny_copy, "evaluate", options={"steps": [0, 10, 40]})

    def no_recompute(*args, **kwargs):
        raise AssertionError("telemetry recomputed although it is stored")

    monkeypatch.setattr(telemetry, "compute", no_recompute)
    (run,) = load_runs([tiny_copy])
    np.testing.assert_array_equal(run.telemetry["l2_to_init"], stored["l2_to_init"])
    report = build_report([run])
    accuracy = report.sections[0][1]["accuracy"].to_dict()
    assert "test (post-hoc)" in json.dumps(accuracy)
    row = report.summary.iloc[0]
    assert row["final test accuracy"] == pytest.approx(float(evaluation["test_accuracy"][-1]))


def test_stale_stored_telemetry_is_recomputed(tiny_copy, monkeypatch):
    from ckpt_tools.store import write_result

    full = telemetry.compute(tiny_copy)
    write_result(tiny_copy, "telemetry", full.isel(step=slice(0, -1)))  # before a resume
    calls = []
    monkeypatch.setattr(telemetry, "compute", lambda history: calls.append(1) or full)
    (run,) = load_runs([tiny_copy])
    assert calls == [1] and run.telemetry.sizes["step"] == full.sizes["step"]


def test_other_stored_analyses_are_drawn_with_their_own_chart(tiny_copy, monkeypatch):
    import types

    import altair as alt
    import xarray as xr

    from ckpt_tools.analyses import registry
    from ckpt_tools.store import write_result

    module = types.ModuleType("custom_analysis")
    module.compute = lambda history: xr.Dataset({"x": ("step", [1.0, 2.0])})
    module.chart = lambda result: alt.Chart(alt.InlineData(values=[{"x": 1}])).mark_point()
    monkeypatch.setitem(sys.modules, "custom_analysis", module)
    monkeypatch.setitem(registry.ANALYSES, "custom", "custom_analysis")
    write_result(tiny_copy, "custom", module.compute(None))
    report = build_report(load_runs([tiny_copy]))
    assert figure_names(report)["Other analyses"] == {"custom"}


def test_the_report_draws_through_the_registered_figures_hooks(tiny_copy, monkeypatch):
    import types

    import altair as alt
    import xarray as xr

    from ckpt_tools.analyses import registry
    from ckpt_tools.store import write_result

    seen = []

    def figures(results):
        seen.append(dict(results))
        return {f"custom-{run}": alt.Chart(alt.InlineData(values=[{"x": 1}])).mark_point()
                for run in results}

    module = types.ModuleType("custom_figures")
    module.compute = lambda history: xr.Dataset({"x": ("step", [1.0, 2.0])})
    module.figures = figures
    monkeypatch.setitem(sys.modules, "custom_figures", module)
    monkeypatch.setitem(registry.ANALYSES, "custom", "custom_figures")
    write_result(tiny_copy, "custom", module.compute(None))
    runs = load_runs([tiny_copy])
    report = build_report(runs)
    assert figure_names(report)["Other analyses"] == {"custom-tiny"}
    (results,) = seen
    assert list(results) == ["tiny"] and results["tiny"]["x"].values.tolist() == [1.0, 2.0]
    telemetry_hook = registry.figures("telemetry", {"tiny": runs[0].telemetry})
    assert set(telemetry_hook) == figure_names(report)["Telemetry"]


def test_page_is_self_contained(two_page):
    text = two_page.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text, re.IGNORECASE)
    assert not re.search(r"""\b(src|href)=["']?(https?:)?//""", text, re.IGNORECASE)
    assert "vegaEmbed" in text and "window.vega" in text
    layer_figures = re.findall(r'data-name="\d+-per-layer-([^"]*-by-layer)"', text)
    assert set(layer_figures) == LAYER_FIGURES and len(layer_figures) == len(LAYER_FIGURES)
    assert text.count('class="chart"') == 2 + len(TELEMETRY_FIGURES) + len(LAYER_FIGURES)


def test_png_and_svg_export(one_report, tmp_path):
    small = replace(one_report, sections=one_report.sections[:1])  # keeps the test quick
    pngs = page.export_figures(small, tmp_path / "png", "png")
    svgs = page.export_figures(small, tmp_path / "svg", "svg")
    n = sum(len(f) for _, f in small.sections)
    assert len(pngs) == len(svgs) == n == 2
    assert pngs[0].name == "01-accuracy-and-loss-loss.png"
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_SIGNATURE
    for p in svgs:
        assert ET.parse(p).getroot().tag.endswith("svg")
    assert (tmp_path / "png" / "summary.csv").read_text().startswith("run,model,dataset")


# The command line ---------------------------------------------------------------------


def test_cli_writes_html_for_two_runs(tiny_run, second_run, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(tiny_run), str(second_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file()
    assert "tiny-again" in out.read_text()


def test_cli_exports_svg_into_a_folder(tiny_run, tmp_path):
    out = tmp_path / "figures"
    result = CliRunner().invoke(app, ["report", str(tiny_run), "--format", "svg", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(out.glob("*.svg")) and (out / "summary.csv").is_file()


def test_cli_missing_store_is_one_line(tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope.zarr"), "-o", str(out)])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert not out.exists()


def test_cli_same_store_twice_is_one_line(tiny_run, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(tiny_run), str(tiny_run), "-o", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: store {tiny_run} is given twice"]
    assert not out.exists()


@pytest.mark.parametrize("where", ["inside-store", "folder-for-html", "file-for-svg"])
def test_cli_refuses_bad_outputs_and_leaves_data_alone(tiny_copy, tmp_path, where):
    before = {p: p.read_bytes() for p in tiny_copy.rglob("*") if p.is_file()}
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    args = {
        "inside-store": ["-o", str(tiny_copy / "report.html")],
        "folder-for-html": ["-o", str(tmp_path)],
        "file-for-svg": ["--format", "svg", "-o", str(existing)],
    }[where]
    result = CliRunner().invoke(app, ["report", str(tiny_copy), *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert existing.read_text() == "keep me"
    assert {p: p.read_bytes() for p in tiny_copy.rglob("*") if p.is_file()} == before


# A real browser ------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    pytest.fail("chromium is not installed: run `bash tests/setup.sh` (installs Debian's "
                "chromium) before the tests")


def test_missing_chromium_fails_and_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="tests/setup.sh"):
        chromium()


def rendered_dom(html: Path, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran, from headless chromium (no network, no profile)."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", html.resolve().as_uri()],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def errors_in(dom: str) -> str:
    match = re.search(r'<pre id="report-errors">(.*?)</pre>', dom, re.DOTALL)
    assert match, "the page lost its error box"
    return match.group(1).strip()


def test_page_draws_every_chart_in_a_browser(two_page, tmp_path):
    dom = rendered_dom(two_page, tmp_path)
    assert errors_in(dom) == ""
    assert re.search(r'<body[^>]*data-status="done"', dom)
    charts = re.split(r'(?=<div class="chart[^"]*" id="fig-)', dom)[1:]
    assert len(charts) == two_page.read_text().count('class="chart"')
    for chart in charts:  # each piece runs from one chart container to the next
        opening = chart[: chart.index(">")]
        assert 'data-rendered="true"' in opening, opening
        assert "<svg" in chart, opening
        assert 'role="graphics-symbol"' in chart, opening  # drawn marks, not just axes


def test_browser_check_sees_script_errors(two_page, tmp_path):
    broken = tmp_path / "broken.html"
    text = two_page.read_text()
    head, tail = text.rsplit("</body>", 1)
    broken.write_text(head + "<script>throw new Error('boom')</script></body>" + tail)
    dom = rendered_dom(broken, tmp_path)
    assert "boom" in errors_in(dom)
    assert re.search(r'<body[^>]*data-status="error"', dom)


def test_page_reports_a_chart_that_fails_to_embed(two_page, tmp_path):
    broken = tmp_path / "bad-spec.html"
    text = two_page.read_text()
    text = re.sub(r'var specs = \{"fig-1":', 'var specs = {"fig-0":{"data":{"url":5}},"fig-1":',
                  text, count=1)
    broken.write_text(text)
    dom = rendered_dom(broken, tmp_path)
    assert "fig-0" in errors_in(dom)
    assert re.search(r'<body[^>]*data-status="error"', dom)


def test_trajectory_analyses_are_drawn_in_a_browser(tiny_copy, second_run, tmp_path):
    """PCA, spectra and run-to-run comparison, stored by ckpt analyze, on the page."""
    done = CliRunner().invoke(app, ["analyze", str(tiny_copy), "--only", "pca,spectra,compare",
                                    "--against", str(second_run), "--quiet"])
    assert done.exit_code == 0, done.output
    report = build_report(load_runs([tiny_copy]))
    assert {"pca", "spectra", "compare"} <= figure_names(report)["Other analyses"]
    out = tmp_path / "trajectory.html"
    page.write_html(report, out)
    dom = rendered_dom(out, tmp_path)
    assert errors_in(dom) == ""
    charts = re.split(r'(?=<div class="chart[^"]*" id="fig-)', dom)[1:]
    for name in ("pca", "spectra", "compare"):
        chart = next(c for c in charts if re.search(rf'data-name="[^"]*{name}"',
                                                    c[: c.index(">")]))
        assert 'data-rendered="true"' in chart[: chart.index(">")], name
        assert "<svg" in chart and 'role="graphics-symbol"' in chart, name  # drawn marks
