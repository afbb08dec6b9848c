"""`ckpt pretrain RUN.zarr --task T --steps N`: pre-training before IMP (Section 5)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from ckpt_tools.analyses.experiments.pretrain import TASKS
from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.imp import PresetName, parse_seeds
from ckpt_tools.cli.location import StorageOptions, store_location
from rich.console import Console
from rich.table import Table

__all__ = ["pretrain"]

TaskName = StrEnum("TaskName", {name: name for name in TASKS})
TaskName.__doc__ = "Pre-training tasks (``ckpt_tools.analyses.experiments.pretrain.TASKS``)."


@friendly
def pretrain(
    store: Annotated[str, typer.Argument(help="A store recorded by `ckpt record` (RUN.zarr); a path or a URL.")],  # noqa: E501
    task: Annotated[TaskName, typer.Option(help="Pre-training task; sparse: the IMP sub-network on the real task.")],  # noqa: E501
    steps: Annotated[int | None, typer.Option(help="Pre-training updates.")] = None,
    blur_factor: Annotated[int | None, typer.Option(help="Block size of blur and blur-rotation, in pixels (default 4).")] = None,  # noqa: E501
    subset_fraction: Annotated[float | None, typer.Option(help="Fraction of the training split kept by subset (default 0.1).")] = None,  # noqa: E501
    seeds: Annotated[str | None, typer.Option(help="Data seeds, comma-separated (default: the dense run's).")] = None,  # noqa: E501
    levels: Annotated[int | None, typer.Option(help="IMP levels after pre-training; for sparse, the level of the IMP mask (default 1).")] = None,  # noqa: E501
    rewind: Annotated[int | None, typer.Option(help="sparse: the IMP lineage (rewind step) whose mask is pre-trained (default 0).")] = None,  # noqa: E501
    fraction: Annotated[float | None, typer.Option(help="Fraction of the surviving weights pruned per level (default 0.2).")] = None,  # noqa: E501
    exclude_output: Annotated[bool | None, typer.Option("--exclude-output/--include-output", help="Never prune the output layer (default: include it).")] = None,  # noqa: E501
    schedule: Annotated[str | None, typer.Option(help="Checkpoint schedule of each run (default: 21 evenly spaced steps).")] = None,  # noqa: E501
    eval_schedule: Annotated[str | None, typer.Option(help="Test evaluations of each run (default: the dense run's).")] = None,  # noqa: E501
    preset: Annotated[PresetName | None, typer.Option(help="Sizes: smoke (CI, seconds) or study (Fashion-MNIST ResNet-20); options override it.")] = None,  # noqa: E501
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Pre-train on another task (or sparse), then run IMP rewinding to the pre-trained weights."""
    store = store_location(store, storage_options)
    from ckpt_tools.analyses.experiments.pretrain import PRESETS, PretrainSettings, run_pretrain

    given = {k: v for k, v in {
        "steps": steps, "blur_factor": blur_factor, "subset_fraction": subset_fraction,
        "seeds": parse_seeds(seeds), "levels": levels, "rewind": rewind, "fraction": fraction,
        "exclude_output": exclude_output, "schedule": schedule, "eval_schedule": eval_schedule,
    }.items() if v is not None}
    settings = {**(PRESETS[preset.value] if preset is not None else {}), **given}
    if "steps" not in settings:
        raise fail("missing --steps (or give --preset smoke|study)", USAGE)
    settings = PretrainSettings(task=task.value, **settings)
    console = Console(stderr=True, quiet=quiet)
    summary = run_pretrain(store, settings, on_run=lambda g, s: console.print(f"training {g}"))
    _print(summary)


def _print(summary) -> None:
    table = Table(title="pre-training, then IMP (final test accuracy)")
    for col in ("task", "pre-training steps", "level", "seed", "remaining", "test accuracy"):
        table.add_column(col, justify="right")
    for t in summary.task.values:
        for n in summary.pretrain_steps.values:
            for level in summary.level.values:
                for s in summary.seed.values:
                    cell = summary.sel(task=t, pretrain_steps=n, level=level, seed=s)
                    acc = float(cell.test_accuracy)
                    if acc == acc:  # conditions not run are NaN
                        table.add_row(str(t), str(n), str(level), str(s),
                                      f"{float(cell.remaining):.4f}", f"{acc:.4f}")
    Console().print(table)
    typer.echo("summary stored in analyses/pretrain_summary")
