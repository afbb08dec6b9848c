"""The `ckpt` application: one module per command, registered here."""

from __future__ import annotations

import typer
from ckpt_tools.cli import (
    ablate,
    analyze,
    compact,
    export,
    imp,
    importer,
    info,
    instability,
    pretrain,
    record,
    report,
)
from ckpt_tools.cli.errors import state

app = typer.Typer(
    name="ckpt",
    help="Record dense early-phase checkpoints into Zarr and analyse them with xarray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
app.command("imp")(imp.imp)
app.command("instability")(instability.instability)
app.command("ablate")(ablate.ablate)
app.command("pretrain")(pretrain.pretrain)
app.command("import")(importer.import_series)
app.command("export")(export.export)
