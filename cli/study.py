"""``ckpt study``: the paper's study end to end, at one of four sizes."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ckpt_tools.analyses.experiments.study import SIZES
from ckpt_tools.cli.errors import friendly

__all__ = ["study"]

Size = StrEnum("Size", {name: name for name in SIZES})
Size.__doc__ = "Study sizes (``ckpt_tools.analyses.experiments.study.SIZES``)."


class Device(StrEnum):
    """Where the recorded run trains."""

    cpu = "cpu"
    cuda = "cuda"


@friendly
def study(
    run_dir: Annotated[Path, typer.Argument(
        help="Folder of the study: its store is RUN_DIR/study.zarr, beside the report "
        "and the summary.")],
    size: Annotated[Size, typer.Option(
        help="smoke: under a minute on the embedded digits; fashion-mnist: about two "
        "hours on 2 CPU cores; gpu and cifar10: for one GPU.")] = Size.smoke,
    device: Annotated[Device, typer.Option(help="Device of the recorded run.")] = Device.cpu,
    data_root: Annotated[Path | None, typer.Option(
        help="Folder holding the dataset files (CIFAR-10).")] = None,
    pilot_threshold: Annotated[float | None, typer.Option(
        help="Stop after the pilot when its error barrier at k = 0 is below this fraction "
        "of test error (default: the size's, 0.01; smoke: 0). Recorded in the "
        "summary.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the commands only.")] = False,
    summary_only: Annotated[bool, typer.Option(
        help="Only summarise the stored results again.")] = False,
) -> None:
    """Run the study of the early phase end to end (continues where it stopped), summarise."""
    from ckpt_tools.analyses.experiments.study import run_study

    run_study(run_dir, size.value, device=device.value,
              data_root=str(data_root) if data_root else None,
              pilot_threshold=pilot_threshold, dry_run=dry_run,
              summary_only=summary_only, echo=lambda line: typer.echo(line))
