"""`ckpt instability RUN.zarr --rewind K`: linear mode connectivity of copies trained from k."""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from typing import Annotated

import typer
from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.imp import PresetName, parse_seeds
from ckpt_tools.cli.location import StorageOptions, store_location
from rich.console import Console
from rich.table import Table

__all__ = ["instability"]


class BnName(StrEnum):
    """How BatchNorm statistics of an interpolated network are obtained."""

    recompute = "recompute"
    interpolate = "interpolate"


@friendly
def instability(
    store: Annotated[str, typer.Argument(help="A store recorded by `ckpt record` (RUN.zarr); a path or a URL.")],  # noqa: E501
    rewind: Annotated[list[int] | None, typer.Option(help="Step k the two copies start from (a stored step); repeat for several.")] = None,  # noqa: E501
    seeds: Annotated[str | None, typer.Option(help="Data-order seeds of the copies, in pairs: 1,2 (default) or 1,2,3,4 for two pairs.")] = None,  # noqa: E501
    points: Annotated[int | None, typer.Option(help="Points on the line between the copies, ends included (default 11).")] = None,  # noqa: E501
    bn: Annotated[BnName | None, typer.Option(help="recompute (default): re-estimate BatchNorm statistics at every point; interpolate: interpolate them.")] = None,  # noqa: E501
    bn_batches: Annotated[int | None, typer.Option(help="Training batches used to re-estimate BatchNorm statistics (default 10).")] = None,  # noqa: E501
    level: Annotated[int | None, typer.Option(help="Train the IMP sub-network of this level instead of the dense network.")] = None,  # noqa: E501
    imp_seed: Annotated[int | None, typer.Option(help="Seed of the IMP lineage holding that mask (default: the dense run's).")] = None,  # noqa: E501
    schedule: Annotated[str | None, typer.Option(help="Checkpoint schedule of each copy, clipped to k..end.")] = None,  # noqa: E501
    eval_schedule: Annotated[str | None, typer.Option(help="Test evaluations during each copy's training (default: the dense run's).")] = None,  # noqa: E501
    preset: Annotated[PresetName | None, typer.Option(help="Sizes: smoke or study; options override it.")] = None,  # noqa: E501
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Train two copies from step k with different data orders; report the error barrier."""
    store = store_location(store, storage_options)
    from ckpt_tools.analyses.experiments.instability import (
        InstabilitySettings,
        result_name,
        run_instability,
    )
    from ckpt_tools.analyses.experiments.presets import get_preset

    given = {k: v for k, v in {
        "rewind_steps": tuple(rewind) if rewind else None, "seeds": parse_seeds(seeds),
        "points": points, "bn": bn.value if bn else None, "bn_batches": bn_batches,
        "level": level, "imp_seed": imp_seed, "schedule": schedule,
        "eval_schedule": eval_schedule,
    }.items() if v is not None}
    if preset is not None:
        settings = replace(get_preset(preset.value).instability, **given)
    elif "rewind_steps" not in given:
        raise fail("missing --rewind (or give --preset smoke|study)", USAGE)
    else:
        settings = InstabilitySettings(**given)
    console = Console(stderr=True, quiet=quiet)
    result = run_instability(
        store, settings, on_copy=lambda k, s: console.print(f"rewind {k}: copy with seed {s}"),
    )
    table = Table(title="instability: test error barrier along the linear path")
    for col in ("rewind", "seeds", "error at ends", "max error", "barrier"):
        table.add_column(col, justify="right")
    for k in result.rewind_step.values:
        for p in result.pair.values:
            cell = result.sel(rewind_step=k, pair=p)
            err = cell.test_error.values
            table.add_row(str(k), f"{int(cell.seed_a)},{int(cell.seed_b)}",
                          f"{err[0]:.4f} / {err[-1]:.4f}", f"{err.max():.4f}",
                          f"{float(cell.barrier):.4f}")
    Console().print(table)
    typer.echo(f"result stored in analyses/{result_name(settings.level)}")
