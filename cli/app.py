"""The `ckpt` application: one module per command, registered here."""

from __future__ import annotations

import typer

from ckpt_tools.cli import (
    analyze,
    compact,
    experiment,
    export,
    importer,
    info,
    record,
    report,
    study,
)
from ckpt_tools.cli.errors import state

app = typer.Typer(
    name="ckpt",
    help="Record dense early-phase checkpoints into Zarr and analyse them with xarray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text renders literally (rich would turn `:100:` into an emoji)
)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state.debug = debug


app.command("record")(record.record)
app.command("info")(info.info)
app.command("compact")(compact.compact)
app.command("analyze")(analyze.analyze)
app.command("report")(report.report)
app.command("study")(study.study)
app.command("import")(importer.import_series)
app.command("export")(export.export)
experiment.add_commands(app)  # one command per registered experiment (generated)
