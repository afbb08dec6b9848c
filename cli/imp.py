"""`ckpt imp RUN.zarr`: iterative magnitude pruning with rewinding, from a recorded run."""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from typing import Annotated

import typer
from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.location import StorageOptions, store_location
from rich.console import Console
from rich.table import Table

__all__ = ["PresetName", "imp", "parse_seeds"]


class PresetName(StrEnum):
    """Experiment sizes (``ckpt_tools.analyses.experiments.presets``)."""

    smoke = "smoke"
    study = "study"


class ScopeName(StrEnum):
    """Where the magnitude threshold applies."""

    global_ = "global"
    layer = "layer"


def parse_seeds(text: str | None) -> tuple[int, ...] | None:
    """``"0,1,2"`` -> ``(0, 1, 2)``; None stays None.

    Raises:
        ValueError: not comma-separated non-negative integers.
    """
    if text is None:
        return None
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}"
        raise ValueError(message) from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds takes comma-separated integers >= 0, got {text!r}")
    return seeds


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


@friendly
def imp(
    store: Annotated[str, typer.Argument(help="A store recorded by `ckpt record` (RUN.zarr); a path or a URL.")],  # noqa: E501
    levels: Annotated[int | None, typer.Option(help="Pruning levels after the dense level 0.")] = None,  # noqa: E501
    rewind: Annotated[list[int] | None, typer.Option(help="Step k to rewind the survivors to (a stored step); repeat for several.")] = None,  # noqa: E501
    seeds: Annotated[str | None, typer.Option(help="Data-order seeds of the retraining, comma-separated (default: the dense run's).")] = None,  # noqa: E501
    fraction: Annotated[float | None, typer.Option(help="Fraction of the surviving weights pruned per level (default 0.2).")] = None,  # noqa: E501
    scope: Annotated[ScopeName | None, typer.Option(help="global: one threshold across layers; layer: the same fraction per layer.")] = None,  # noqa: E501
    exclude_output: Annotated[bool | None, typer.Option("--exclude-output/--include-output", help="Never prune the output layer (default: include it).")] = None,  # noqa: E501
    schedule: Annotated[str | None, typer.Option(help="Checkpoint schedule of each level, clipped to k..end (default: 21 evenly spaced steps).")] = None,  # noqa: E501
    eval_schedule: Annotated[str | None, typer.Option(help="Test evaluations of each level (default: the dense run's).")] = None,  # noqa: E501
    preset: Annotated[PresetName | None, typer.Option(help="Sizes: smoke (CI, seconds) or study (Fashion-MNIST ResNet-20, about an hour); options override it.")] = None,  # noqa: E501
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Find sparse sub-networks by IMP with rewinding to step k; record every level."""
    store = store_location(store, storage_options)
    from ckpt_tools.analyses.experiments.imp import ImpSettings, run_imp
    from ckpt_tools.analyses.experiments.presets import get_preset

    given = _given(
        levels=levels, rewind_steps=tuple(rewind) if rewind else None, seeds=parse_seeds(seeds),
        fraction=fraction, scope=scope.value if scope else None,
        exclude_output=exclude_output, schedule=schedule, eval_schedule=eval_schedule,
    )
    if preset is not None:
        settings = replace(get_preset(preset.value).imp, **given)
    else:
        missing = [f"--{k.split('_')[0]}" for k in ("levels", "rewind_steps") if k not in given]
        if missing:
            raise fail(f"missing {' and '.join(missing)} (or give --preset smoke|study)", USAGE)
        settings = ImpSettings(**given)
    console = Console(stderr=True, quiet=quiet)
    summary = run_imp(
        store, settings,
        on_level=lambda k, s, n: console.print(f"rewind {k}, seed {s}: level {n}"),
    )
    _print_summary(summary)


def _print_summary(summary) -> None:
    table = Table(title="IMP summary (final test accuracy)")
    for col in ("rewind", "seed", "level", "remaining", "test accuracy"):
        table.add_column(col, justify="right")
    for k in summary.rewind_step.values:
        for s in summary.seed.values:
            for n in summary.level.values:
                cell = summary.sel(rewind_step=k, seed=s, level=n)
                acc = float(cell.test_accuracy)
                rem = float(cell.remaining)
                if rem == rem:  # levels never pruned in this lineage are NaN
                    table.add_row(str(k), str(s), str(n), f"{rem:.4f}",
                                  "-" if acc != acc else f"{acc:.4f}")
    Console().print(table)
    typer.echo(f"summary stored in analyses/imp_summary ({summary.sizes['level'] - 1} levels)")
