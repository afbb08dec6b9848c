"""The report: what a store holds, drawn as charts and assembled into one page.

`build` gathers the runs and builds the sections; the chart modules are pure functions
from datasets to Altair charts; `page` renders a report as HTML or image files.
"""

from ckpt_tools.analyses.report.build import (
    SECTIONS,
    Report,
    Run,
    Section,
    build_report,
    load_runs,
    summary_table,
)

__all__ = ["SECTIONS", "Report", "Run", "Section", "build_report", "load_runs", "summary_table"]
