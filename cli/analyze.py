"""`ckpt analyze RUN.zarr`: compute the registered analyses and store them in the store."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ckpt_tools.analyses import registry
from ckpt_tools.api import open_history
from ckpt_tools.cli.dask_progress import track
from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.location import StorageOptions, store_location
from ckpt_tools.schedule import Schedule
from ckpt_tools.store import result_path

__all__ = ["analyze"]


def _names(only: list[str] | None) -> list[str]:
    if not only:
        return registry.names()
    wanted = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in registry.ANALYSES]
    if unknown:
        raise fail(f"unknown analysis {unknown[0]!r}; registered: "
                   f"{', '.join(registry.names())}", USAGE)
    return list(dict.fromkeys(wanted))


@contextlib.contextmanager
def _client(workers: int | None, scheduler: str | None) -> Iterator[object | None]:
    """A dask.distributed client for --workers/--scheduler, else None (local threads)."""
    if workers is None and scheduler is None:
        yield None
        return
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    if scheduler is not None:
        with Client(scheduler, timeout="10s") as client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise fail(f"unknown --device {device!r}; use cpu or cuda", USAGE) from None
    if kind not in ("cpu", "cuda"):
        raise fail(f"unknown --device {device!r}; use cpu or cuda", USAGE)
    if kind == "cuda" and not torch.cuda.is_available():
        raise fail(f"--device {device} asked for, but this machine has no CUDA device; "
                   "use --device cpu", USAGE)


def parse_against(spec: str) -> tuple[str | None, str]:
    """``OTHER.zarr[:GROUP]`` (or ``:GROUP``: None, this store) as ``(store, group)``.

    A URL's ``scheme://`` is not a group separator: ``s3://b/run.zarr:imp/level_1``.
    """
    path, sep, group = spec.rpartition(":")
    if not sep or group.startswith("/"):  # no group, or a URL scheme / drive letter
        path, group = spec, "train"
    if not group:
        raise fail(f"--against {spec!r}: empty group after ':'; give OTHER.zarr[:GROUP]",
                   USAGE)
    return (path or None), group


@friendly
def analyze(
    store: Annotated[str, typer.Argument(
        help="A recorded store: RUN.zarr or a URL (s3://bucket/run.zarr).",
    )],
    only: Annotated[list[str] | None, typer.Option(
        "--only",
        help="Analyses to run, comma-separated or repeated (default: every registered one).",
    )] = None,
    group: Annotated[str, typer.Option(help="The recorded history to analyse.")] = "train",
    workers: Annotated[int | None, typer.Option(
        help="Run on a local dask cluster of N worker processes.",
    )] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Run on the dask.distributed cluster at this address (tcp://host:port).",
    )] = None,
    eval_steps: Annotated[str | None, typer.Option(
        help="Steps to evaluate post hoc, as a schedule (0:1000:50, log2:10, a list 0,10,100); "
        "only recorded steps are used (default: every recorded step).",
    )] = None,
    against: Annotated[str | None, typer.Option(
        help="Compare with another history (the compare analysis): OTHER.zarr, OTHER.zarr:GROUP, "
        "or :GROUP for a group of this store.",
    )] = None,
    device: Annotated[str, typer.Option(
        help="Where telemetry chunks are reduced and models evaluated: cpu, or a CUDA device "
        "(cuda, cuda:1); chunks are always decoded on the CPU.",
    )] = "cpu",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Compute the registered analyses of one history and store each in the same store.

    Each result is written to analyses/<name> (analyses/<group>/<name> for a group other
    than train), replacing a previous one whole; an interrupted run leaves it intact.
    """
    names = _names(only)
    store = store_location(store, storage_options)
    if workers is not None and scheduler is not None:
        raise fail("--workers and --scheduler exclude each other; give one", USAGE)
    if workers is not None and workers < 1:
        raise fail(f"--workers must be at least 1, got {workers}", USAGE)
    if device != "cpu":
        _check_device(device)
    stored = open_history(store, group)["step"].values
    if against is not None:
        other, other_group = parse_against(against)
        other = store if other is None else store_location(other, storage_options)
        open_history(other, other_group)  # a missing store or group fails here, in one line
    if stored.size == 0:
        raise fail(f"'{group}' in {store} has no recorded steps yet")
    options = {"telemetry": {}, "evaluate": {}}
    if device != "cpu":
        options["telemetry"]["device"] = options["evaluate"]["device"] = device
    if eval_steps is not None:
        wanted = Schedule.parse(eval_steps, final=int(stored[-1])).steps
        picked = sorted(set(wanted) & {int(s) for s in stored})
        options["evaluate"]["steps"] = picked
    if against is not None:
        options["compare"] = {"against": other, "against_group": other_group}
    console = Console(stderr=True)
    done, skipped = [], []
    with _client(workers, scheduler) as client, Progress(
        TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("tasks"), TimeElapsedColumn(), console=console, disable=quiet,
    ) as bar:
        for name in names:
            task = bar.add_task(name, total=None)
            try:
                with track(bar, task, client):
                    result = registry.run(store, name, group=group, options=options.get(name))
            except registry.NotApplicable as exc:
                if only:
                    raise
                skipped.append(f"{name}: skipped ({exc})")
                bar.update(task, visible=False)
                continue
            done.append(f"{name}: {len(result.data_vars)} variables over "
                        f"{result.sizes.get('step', 0)} steps -> "
                        f"{store}/{result_path(name, group)}")
    for line in done + skipped:
        typer.echo(line)
