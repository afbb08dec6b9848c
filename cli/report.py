"""`ckpt report RUN.zarr [MORE.zarr ...]`: every chart and a summary, as HTML, PNG or SVG."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.location import StorageOptions, store_location
from ckpt_tools.store import Location

__all__ = ["report"]


class Format(StrEnum):
    """What `ckpt report` writes."""

    html = "html"
    png = "png"
    svg = "svg"


DEFAULT_OUT = {Format.html: Path("report.html"), Format.png: Path("report-figures"),
               Format.svg: Path("report-figures")}


def _check_out(out: Path, fmt: Format, stores: list[Location]) -> None:
    """Refuse outputs that would overwrite a store or land in a missing folder."""
    resolved = out.resolve()
    for store in stores:
        if not store.is_local:
            continue
        s = store.path.resolve()
        if resolved == s or s in resolved.parents:
            raise fail(f"output {out} would write into the store {store}; choose another -o",
                       USAGE)
    if fmt is Format.html:
        if out.is_dir():
            raise fail(f"{out} is a folder; -o takes the HTML file to write", USAGE)
        if not out.parent.is_dir():
            raise fail(f"folder {out.parent} does not exist; create it or choose another -o",
                       USAGE)
    elif out.exists() and not out.is_dir():
        raise fail(f"{out} is a file; with --format {fmt} -o takes a folder for the figures",
                   USAGE)


@friendly
def report(
    stores: Annotated[list[str], typer.Argument(
        help="Recorded stores (RUN.zarr or URLs); several are overlaid, coloured by run.",
    )],
    out: Annotated[Path | None, typer.Option(
        "-o", "--out",
        help="HTML file to write (default report.html), or with --format png/svg the folder for "
        "one file per chart (default report-figures/).",
    )] = None,
    fmt: Annotated[Format, typer.Option(
        "--format",
        help="html: one self-contained page; png/svg: one file per chart plus summary.csv.",
    )] = Format.html,
    group: Annotated[str, typer.Option(
        help="History group to report in every store.",
    )] = "train",
    title: Annotated[str | None, typer.Option(
        help="Page title (default: the run names).",
    )] = None,
    storage_options: StorageOptions = None,
) -> None:
    """Draw every available chart of one or more runs, with a summary table."""
    from ckpt_tools.analyses.report import build_report, load_runs, page

    out = DEFAULT_OUT[fmt] if out is None else out
    stores = [store_location(s, storage_options) for s in stores]
    _check_out(out, fmt, stores)
    runs = load_runs(stores, group=group)
    built = build_report(runs, title=title)
    n = sum(len(figures) for _, figures in built.sections)
    if fmt is Format.html:
        page.write_html(built, out)
        runs_text = "1 run" if len(built.summary) == 1 else f"{len(built.summary)} runs"
        typer.echo(f"wrote {out} ({n} figures, {runs_text})")
    else:
        written = page.export_figures(built, out, fmt.value)
        typer.echo(f"wrote {len(written)} {fmt} figures and summary.csv to {out}/")
