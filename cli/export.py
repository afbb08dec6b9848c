"""`ckpt export RUN.zarr --step S -o FILE`: one stored step as a checkpoint file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckpt_tools.cli.errors import friendly
from ckpt_tools.cli.location import StorageOptions, store_location
from ckpt_tools.exporter import ExportFormat, export_step

__all__ = ["export"]


@friendly
def export(
    store: Annotated[str, typer.Argument(help="A recorded or imported store (RUN.zarr or a URL).")],
    step: Annotated[int, typer.Option(help="The stored step to export.")] = ...,
    out: Annotated[Path, typer.Option("-o", "--out", help="File to write.")] = ...,
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="safetensors (Hugging Face's from_pretrained reads it as model.safetensors) or "
            "torch "
            "(torch.save).",
        ),
    ] = ExportFormat.safetensors,
    group: Annotated[str, typer.Option(help="History group to read.")] = "train",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Write the state dict stored at a step, in its original names and dtypes."""
    export_step(
        store_location(store, storage_options), step, out, group=group, fmt=fmt, overwrite=overwrite
    )
    typer.echo(f"wrote step {step} of group '{group}' in {store} to {out} ({fmt})")
