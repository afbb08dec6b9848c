"""Rendering a `Report`: one self-contained HTML page, or one PNG/SVG file per figure.

The page embeds the Vega, Vega-Lite and vega-embed JavaScript that vl-convert bundles,
so it opens offline and from any folder. It records its own failures for tests and
readers alike: script errors and failed chart embeds are listed in the element
``#report-errors``, each chart container gets ``data-rendered="true"`` once drawn, and
``<body data-status>`` becomes ``done`` when every chart has settled, or ``error`` as
soon as anything failed.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import re
from pathlib import Path

import altair as alt
import pandas as pd
import vl_convert

from ckpt_tools.analyses.report.sections import Report

__all__ = ["FORMATS", "export_figures", "render_html", "write_html"]

FORMATS = ("html", "png", "svg")
PNG_SCALE = 2  # pixels per CSS pixel in exported PNGs


@functools.cache
def _javascript() -> str:
    """Vega + Vega-Lite + vega-embed, matching the Vega-Lite version Altair writes."""
    wanted = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    version = wanted if wanted in vl_convert.get_vegalite_versions() else None
    return vl_convert.javascript_bundle(vl_version=version)


def _inline_json(value) -> str:
    """JSON that cannot close or confuse the inline ``<script>`` element it sits in."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _inline_script(code: str) -> str:
    if re.search(r"</script|<!--", code, flags=re.IGNORECASE):
        raise RuntimeError("the bundled JavaScript cannot be inlined in a <script> element")
    return code


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "figure"


def _fmt(value, fmt: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    return format(value, fmt) if fmt else str(value)


_FORMATS = {
    "parameters": ",",
    "final test accuracy": ".2%",
    "compression (raw/stored)": ".3f",
    "sign changes at end": ".2%",
    "L2 to init at end": ".4g",
    "cosine to init at end": ".4f",
    "mean |w| at start": ".4g",
    "mean |w| at end": ".4g",
}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(summary: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in summary.columns)
    body = []
    for _, row in summary.iterrows():
        cells = []
        for col, value in row.items():
            text = _size(int(value)) if col == "store size (bytes)" else _fmt(
                value, _FORMATS.get(str(col), ""))
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
p.note { color: #555; max-width: 60em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f3f3f3; } td:first-child { text-align: left; }
.chart { margin: 1em 0; overflow-x: auto; }
#report-errors { color: #b00; white-space: pre-wrap; }
"""

_ERROR_CAPTURE = """
window.reportErrors = [];
function showReportErrors() {
  var box = document.getElementById("report-errors");
  if (box) { box.textContent = window.reportErrors.join("\\n"); }
  if (document.body && window.reportErrors.length) { document.body.dataset.status = "error"; }
}
function recordReportError(message) {
  window.reportErrors.push(String(message));
  showReportErrors();
}
window.addEventListener("error", function (e) {
  recordReportError("script error: " + e.message);
});
window.addEventListener("unhandledrejection", function (e) {
  recordReportError("unhandled rejection: " + e.reason);
});
"""

_EMBED = """
(function () {
  showReportErrors();
  var specs = %s;
  var jobs = Object.keys(specs).map(function (id) {
    return vegaEmbed("#" + id, specs[id], {renderer: "svg", actions: {export: true,
        source: false, compiled: false, editor: false}})
      .then(function () { document.getElementById(id).dataset.rendered = "true"; })
      .catch(function (err) { recordReportError(id + ": " + err); });
  });
  Promise.all(jobs).then(function () {
    document.body.dataset.status = window.reportErrors.length ? "error" : "done";
  });
})();
"""


def _figure_ids(report: Report) -> list[tuple[str, str, alt.TopLevelMixin]]:
    """``(container id, file stem, chart)`` for every figure, numbered in page order."""
    out = []
    for section, figures in report.sections:
        for name, chart in figures.items():
            n = len(out) + 1
            out.append((f"fig-{n}", f"{n:02d}-{_slug(section.title)}-{_slug(name)}", chart))
    return out


def render_html(report: Report) -> str:
    """The report as one HTML page with every script and all data inline (no network)."""
    figures = _figure_ids(report)
    specs = {fid: chart.to_dict() for fid, _, chart in figures}
    parts = [f"<h1>{html.escape(report.title)}</h1>", "<h2>Summary</h2>",
             _table(report.summary), '<pre id="report-errors"></pre>']
    ids = iter(figures)
    for section, figs in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.description:
            parts.append(f'<p class="note">{html.escape(section.description)}</p>')
        for name in figs:
            fid, stem, _ = next(ids)
            parts.append(f'<div class="chart" id="{fid}" data-name="{html.escape(stem)}" '
                         f'title="{html.escape(name)}"></div>')
    embed = _EMBED % _inline_json(specs)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(report.title)}</title>", f"<style>{_STYLE}</style>",
        f"<script>{_ERROR_CAPTURE}</script>",
        f"<script>{_inline_script(_javascript())}</script>",
        "</head>", '<body data-status="loading">', *parts,
        f"<script>{embed}</script>", "</body>", "</html>", "",
    ])


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, so a failure leaves no half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_html(report: Report, out: str | Path) -> Path:
    """Write the report page to `out` (a file; its folder must exist). Returns `out`."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; give the HTML file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {out.parent} does not exist")
    _write_atomic(out, render_html(report).encode("utf-8"))
    return out


def export_figures(report: Report, directory: str | Path, fmt: str) -> list[Path]:
    """Write each figure as ``NN-section-name.<fmt>`` (png or svg) and ``summary.csv``.

    The directory is created if missing; files of the same names are replaced.

    Returns:
        The written figure paths, in page order.
    """
    if fmt not in ("png", "svg"):
        raise ValueError(f"figure format must be png or svg, got {fmt!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; give a folder for {fmt} figures")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for _, stem, chart in _figure_ids(report):
        spec = chart.to_dict()
        if fmt == "png":
            data = vl_convert.vegalite_to_png(spec, scale=PNG_SCALE)
        else:
            data = vl_convert.vegalite_to_svg(spec).encode("utf-8")
        path = directory / f"{stem}.{fmt}"
        _write_atomic(path, data)
        written.append(path)
    _write_atomic(directory / "summary.csv", report.summary.to_csv(index=False).encode("utf-8"))
    return written
