"""`ckpt info RUN.zarr`: what a store holds, in a readable table."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ckpt_tools.cli.errors import friendly
from ckpt_tools.cli.location import StorageOptions, store_location
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
    store: Annotated[str, typer.Argument(
        help="A recorded store: RUN.zarr or a URL (s3://bucket/run.zarr).",
    )],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Show a store's groups, steps, layers, size on disk, compression ratio and config.

    Warns about rows identical to another step's, steps out of order and gaps against
    the schedule.
    """
    summary = store_info(store_location(store, storage_options))
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
    for g in summary["groups"]:
        table = Table(title=f"history '{g['group']}'", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        table.add_row("steps", f"{g['steps']} recorded ({g['first_step']} to {g['last_step']}; "
                               f"{g['scheduled_steps']} scheduled)")
        table.add_row("layers", f"{g['layers']} tensors ({g['prunable_layers']} prunable)")
        table.add_row("parameters", f"{g['parameters']:,} (+ {g['buffer_elements']:,} in buffers)")
        codec = g.get("codec", "-")
        if codec == "none":
            codec = "none: uncompressed; `ckpt compact` compresses it"
        table.add_row("stored", f"{_size(g['stored_bytes'])} of {_size(g['raw_bytes'])} raw "
                                f"float32: stored/raw = {g['ratio']:.3f} (codec {codec})")
        shown = {k: v for k, v in g["config"].items() if v is not None}
        if shown:
            table.add_row("config", ", ".join(f"{k}={v}" for k, v in shown.items()))
        console.print(table)
        for line in g.get("warnings", []):
            console.print(f"[yellow]warning:[/yellow] {line}", soft_wrap=True)
