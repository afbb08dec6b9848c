"""`ckpt import SOURCE... --out RUN.zarr`: a series of existing checkpoints as a history."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.location import StorageOptions, store_location

__all__ = ["import_series"]


@friendly
def import_series(
    sources: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Checkpoint files (.pt, .pth, .bin, .ckpt, .safetensors), checkpoint folders "
            "(save_pretrained, checkpoint-N/), or folders of them.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Store to write (RUN.zarr or an s3:// URL); created if missing."
        ),
    ] = ...,
    group: Annotated[str, typer.Option(help="History group to create.")] = "train",
    hf_repo: Annotated[
        str | None,
        typer.Option(
            help="Read the revisions of this Hugging Face repository (ORG/NAME) from the local "
            "cache, offline."
        ),
    ] = None,
    revisions: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated revisions of --hf-repo, in order (step0,step1,step2,...)."
        ),
    ] = None,
    hf_cache: Annotated[
        Path | None,
        typer.Option(
            help="Hugging Face hub cache folder (default: HF_HUB_CACHE or "
            "~/.cache/huggingface/hub)."
        ),
    ] = None,
    step_regex: Annotated[
        str | None,
        typer.Option(
            help="Regular expression whose first group is the step in a source's name, for "
            "sources whose metadata has none (default: the name's last number)."
        ),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            help="The schedule the series was saved on (text form or preset, e.g. pythia): "
            "missing steps are reported as gaps."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing group of the same name.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Import a series of existing checkpoints into a history group, bit for bit.

    Steps come from each checkpoint's metadata (trainer_state.json, Lightning's
    global_step), else from its name. Prints the integrity warnings of `ckpt info`.
    """
    from ckpt_tools.importer import find_checkpoints, hub_checkpoints, import_checkpoints

    if not sources and hf_repo is None:
        raise fail("nothing to import: pass checkpoint files or folders, or --hf-repo", USAGE)
    if revisions is not None and hf_repo is None:
        raise fail("--revisions needs --hf-repo", USAGE)
    checkpoints = find_checkpoints(list(sources or []))
    if hf_repo is not None:
        # The cache is read offline; nothing is ever downloaded.
        os.environ["HF_HUB_OFFLINE"] = "1"
        names = [r.strip() for r in (revisions or "").split(",") if r.strip()]
        checkpoints += hub_checkpoints(hf_repo, names, cache_dir=hf_cache)
    with Progress(
        TextColumn("[bold]importing[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=quiet,
    ) as bar:
        task = bar.add_task("import", total=len(checkpoints))
        report = import_checkpoints(
            store_location(out, storage_options),
            checkpoints,
            group=group,
            step_regex=step_regex,
            schedule=schedule,
            overwrite=overwrite,
            progress=lambda done: bar.update(task, completed=done),
        )
    for line in report.notes:
        typer.secho(f"note: {line}", err=True, fg="yellow")
    for line in report.warnings:
        typer.secho(f"warning: {line}", err=True, fg="yellow")
    steps = report.steps
    typer.echo(
        f"imported {len(steps)} checkpoints (steps {min(steps)} to {max(steps)}, "
        f"{report.parameters:,} parameters, {report.buffer_elements:,} buffer values) "
        f"into group '{report.group}' of {out}"
    )
