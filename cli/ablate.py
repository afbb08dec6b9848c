"""`ckpt ablate RUN.zarr --rewind K --kind NAME`: ablations of the IMP sub-network at step k."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from ckpt_tools.analyses.experiments.perturb import ABLATIONS
from ckpt_tools.cli.errors import friendly
from ckpt_tools.cli.imp import PresetName, parse_seeds
from ckpt_tools.cli.location import StorageOptions, store_location
from rich.console import Console
from rich.table import Table

__all__ = ["ablate"]

Kind = StrEnum("Kind", {name: name for name in sorted(ABLATIONS)})
Kind.__doc__ = "Ablation kinds (``ckpt_tools.analyses.experiments.perturb.ABLATIONS``)."


@friendly
def ablate(
    store: Annotated[str, typer.Argument(help="A store with IMP masks (`ckpt imp`), RUN.zarr; a path or a URL.")],  # noqa: E501
    rewind: Annotated[int, typer.Option(help="Rewind step k of the IMP lineage (run `ckpt imp` with it first).")],  # noqa: E501
    kind: Annotated[list[Kind], typer.Option(help="Ablation to run; repeat for several.")],
    level: Annotated[int | None, typer.Option(help="IMP level whose mask is ablated (default: the highest stored).")] = None,  # noqa: E501
    seeds: Annotated[str | None, typer.Option(help="Data seeds, comma-separated, one IMP lineage each (default: every lineage stored).")] = None,  # noqa: E501
    alpha: Annotated[list[float] | None, typer.Option(help="Noise scale of --kind noise, in layer standard deviations (default 1); repeat for several.")] = None,  # noqa: E501
    schedule: Annotated[str | None, typer.Option(help="Checkpoint schedule of each run, clipped to k..end (default: 21 evenly spaced steps).")] = None,  # noqa: E501
    eval_schedule: Annotated[str | None, typer.Option(help="Test evaluations of each run (default: the dense run's).")] = None,  # noqa: E501
    preset: Annotated[PresetName | None, typer.Option(help="Sizes: smoke (CI, seconds) or study (Fashion-MNIST ResNet-20); options override it.")] = None,  # noqa: E501
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Ablate the IMP sub-network at step k (signs, magnitudes, permutations, noise, controls)."""
    store = store_location(store, storage_options)
    from ckpt_tools.analyses.experiments.ablate import PRESETS, AblationSettings, run_ablations

    given = {k: v for k, v in {
        "level": level, "seeds": parse_seeds(seeds), "alphas": tuple(alpha) if alpha else None,
        "schedule": schedule, "eval_schedule": eval_schedule,
    }.items() if v is not None}
    defaults = PRESETS[preset.value] if preset is not None else {}
    settings = AblationSettings(
        rewind=rewind, kinds=tuple(k.value for k in kind), **{**defaults, **given}
    )
    console = Console(stderr=True, quiet=quiet)
    summary = run_ablations(
        store, settings, on_run=lambda c, s: console.print(f"rewind {rewind}: {c}, seed {s}")
    )
    _print(summary.sel(rewind_step=rewind))


def _print(summary) -> None:
    table = Table(title="ablations (final test accuracy)")
    for col in ("kind", "level", "seed", "remaining", "test accuracy"):
        table.add_column(col, justify="right")
    for c in summary.kind.values:
        for n in summary.level.values:
            for s in summary.seed.values:
                cell = summary.sel(kind=c, level=n, seed=s)
                acc = float(cell.test_accuracy)
                if acc == acc:  # conditions not run are NaN
                    table.add_row(str(c), str(n), str(s), f"{float(cell.remaining):.4f}",
                                  f"{acc:.4f}")
    Console().print(table)
    typer.echo("summary stored in analyses/ablate_summary")
