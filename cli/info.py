"""`ckpt info RUN.zarr`: what a store holds, in a readable table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from ckpt_tools.cli.errors import friendly
from rich.console import Console
from rich.table import Table

from ckpt_tools.store import store_info

__all__ = ["info"]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


@friendly
def info(
    store: Annotated[Path, typer.Argument(help="A recorded store (RUN.zarr).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a store's groups, steps, layers, size on disk, compression ratio and config."""
    summary = store_info(store)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    prov = summary["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items() if v)
    console.print(f"[bold]{summary['path']}[/bold]  format {summary['format_version']}, "
                  f"{_size(summary['size_on_disk'])} on disk")
    console.print(f"created {prov.get('created')}  git {prov.get('git_sha') or '-'}")
    console.print(versions)
    table = Table(title="recorded histories")
    for col in ("group", "steps", "first", "last", "layers (prunable)", "parameters",
                "raw", "stored", "stored/raw"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for g in summary["groups"]:
        table.add_row(
            g["group"], str(g["steps"]), str(g["first_step"]), str(g["last_step"]),
            f"{g['layers']} ({g['prunable_layers']})", f"{g['parameters']:,}",
            _size(g["raw_bytes"]), _size(g["stored_bytes"]), f"{g['ratio']:.3f}",
        )
    console.print(table)
    for g in summary["groups"]:
        config = g["config"]
        if config:
            shown = {k: v for k, v in config.items() if v is not None}
            console.print(f"[bold]{g['group']}[/bold] config: " + ", ".join(
                f"{k}={v}" for k, v in shown.items()))
