"""The report: what a store holds, drawn as charts and assembled into one page.

`read` is the one module that reads stored results for the report (runs, telemetry,
evaluations, experiment summaries reduced over seeds); the chart modules (`charts`,
`imp_charts`, `ablation_charts`) are pure functions from datasets to Altair charts;
`sections` turns loaded runs into named figures; `page` renders a report as HTML or
image files.
"""

from ckpt_tools.analyses.report.read import Experiments, Run, gather_experiments, load_runs
from ckpt_tools.analyses.report.sections import (
    SECTIONS,
    Report,
    Section,
    build_report,
    summary_table,
)

__all__ = [
    "SECTIONS",
    "Experiments",
    "Report",
    "Run",
    "Section",
    "build_report",
    "gather_experiments",
    "load_runs",
    "summary_table",
]
