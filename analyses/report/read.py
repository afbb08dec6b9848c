"""The one reader of stored results for the report.

`load_runs` opens each store's history with everything the report draws from it: the
telemetry and post-hoc evaluation, the other registered analyses' results, and the
experiment summaries reduced over seeds (mean, Student t interval and n, see
`ckpt_tools.analyses.stats.summarize`). Chart functions and sections then only draw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from ckpt_tools import open_history, open_store
from ckpt_tools.store import (
    Location,
    StoreError,
    as_location,
    list_results,
    read_result,
    store_info,
)

__all__ = ["RESAMPLES", "Experiments", "Run", "gather_experiments", "load_runs"]

RESAMPLES = 2000  # bootstrap resamples, where a summary asks for BCa intervals
_INSTABILITY = re.compile(r"^instability(?:_level_(\d+))?_summary$")
_DRAWN_WITH_HISTORY = ("telemetry", "evaluate")  # results the report reads into `Run` fields


@dataclass(frozen=True)
class Experiments:
    """A store's experiment results, each reduced over seeds (None or empty when absent).

    Attributes:
        imp: ``imp_summary`` reduced over ``seed`` (attrs keep ``dense_test_accuracy``).
        instability: ``{level: result reduced over pair}``; level None is the dense network.
        ablations: ``ablate_summary`` reduced over ``seed``.
        pretraining: ``pretrain_summary`` reduced over ``seed``.
    """

    imp: xr.Dataset | None = None
    instability: dict[int | None, xr.Dataset] = field(default_factory=dict)
    ablations: xr.Dataset | None = None
    pretraining: xr.Dataset | None = None


@dataclass(frozen=True, eq=False)
class Run:
    """One recorded history as the report sees it.

    Attributes:
        name: label of the run in legends and the summary table.
        path: the store.
        group: the history group inside the store (e.g. ``train``).
        history: the history, lazily opened (committed steps only).
        telemetry: its telemetry (stored by ``ckpt analyze`` or computed here), or None.
        evaluation: the stored post-hoc evaluation (``test_loss``, ``test_accuracy`` on
            ``step``), or None.
        info: ``store_info(path)``.
        tree: the whole store, lazily opened, for sections that read other groups.
        results: the other registered analyses' results stored for `group`, by name.
        experiments: the store's experiment results, reduced over seeds.
    """

    name: str
    path: Location
    group: str
    history: xr.Dataset
    telemetry: xr.Dataset | None
    evaluation: xr.Dataset | None
    info: dict
    tree: xr.DataTree
    results: dict[str, xr.Dataset] = field(default_factory=dict)
    experiments: Experiments = field(default_factory=Experiments)


def _names(paths: Sequence[Location]) -> list[str]:
    """Store names without ``.zarr``; repeated names get their parent folder prefixed."""
    stems = [p.name.removesuffix(".zarr") or p.name for p in paths]
    return [
        f"{p.parent.name}/{s}" if stems.count(s) > 1 and p.parent.name else s
        for p, s in zip(paths, stems, strict=True)
    ]


def _stored(path: Path, name: str, group: str, history: xr.Dataset) -> xr.Dataset | None:
    """The result `name` that ``ckpt analyze`` stored for `group`, if it covers every step.

    A result computed before the history grew (a resumed run) is ignored.
    """
    if not any(r["analysis"] == name and r["group"] == group for r in list_results(path)):
        return None
    result = read_result(path, name, group=group)
    if name == "telemetry" and not np.array_equal(result["step"].values, history["step"].values):
        return None
    return result


def _telemetry(path: Path, group: str, history: xr.Dataset) -> xr.Dataset:
    """The stored telemetry of `group` if ``ckpt analyze`` wrote it, else computed now."""
    stored = _stored(path, "telemetry", group, history)
    if stored is not None:
        return stored
    from ckpt_tools.analyses import telemetry

    return telemetry.compute(history)


def _registered(path: Path, group: str) -> dict[str, xr.Dataset]:
    from ckpt_tools.analyses import registry

    return {r["analysis"]: read_result(path, r["analysis"], group=group)
            for r in list_results(path)
            if r["group"] == group and r["analysis"] in registry.ANALYSES
            and r["analysis"] not in _DRAWN_WITH_HISTORY}


def gather_experiments(path: str | Path) -> Experiments:
    """The experiment summaries stored in `path`, each reduced over its seeds.

    ``imp_summary``, ``instability[_level_<n>]_summary``, ``ablate_summary`` and
    ``pretrain_summary``, where stored (the results of the root history ``train``).
    """
    from ckpt_tools.analyses.stats import summarize

    stored = {r["analysis"] for r in list_results(path) if r["group"] == "train"}

    def reduced(name: str, dim: str) -> xr.Dataset | None:
        if name not in stored:
            return None
        return summarize(read_result(path, name), dim, n_resamples=RESAMPLES)

    instability = {}
    for name in sorted(stored):
        match = _INSTABILITY.match(name)
        if match is not None:
            level = None if match.group(1) is None else int(match.group(1))
            instability[level] = reduced(name, "pair")
    return Experiments(imp=reduced("imp_summary", "seed"), instability=instability,
                       ablations=reduced("ablate_summary", "seed"),
                       pretraining=reduced("pretrain_summary", "seed"))


def load_runs(
    paths: Sequence[str | Path | Location], *, group: str = "train",
    names: Sequence[str] | None = None,
) -> list[Run]:
    """Open each store's history `group` with everything the report draws from the store.

    Raises:
        StoreError: a store is missing, unreadable, or has no such history group.
        ValueError: no store, a store given twice, or `names` not one distinct name per
            store.
    """
    paths = [as_location(p) for p in paths]
    if not paths:
        raise ValueError("no stores given")
    resolved = [p.path.resolve() if p.is_local else p.url for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise ValueError(f"store {paths[i]} is given twice")
    names = list(names) if names is not None else _names(paths)
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct run name per store, got {names}")
    runs = []
    for name, path in zip(names, paths, strict=True):
        history = open_history(path, group)
        if history.sizes.get("step", 0) == 0:
            raise StoreError(f"'{group}' in {path} has no recorded steps yet")
        runs.append(Run(
            name=name, path=path, group=group, history=history,
            telemetry=_telemetry(path, group, history),
            evaluation=_stored(path, "evaluate", group, history),
            info=store_info(path), tree=open_store(path),
            results=_registered(path, group), experiments=gather_experiments(path),
        ))
    return runs
