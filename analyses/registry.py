"""The registry of analyses that ``ckpt analyze`` runs: name -> module.

An analysis is one module with a pure ``compute(history, **options) -> xarray.Dataset``
and, optionally, the drawing hooks ``chart(result) -> altair.Chart`` (one result) and
``figures(results, **options) -> {name: chart}`` (several runs' results, ``{run name:
result}``). The report draws every stored result through these hooks (`figures`).
Adding an analysis is one line in `ANALYSES`. Modules are imported when first used, so
listing names costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import xarray as xr

from ckpt_tools.analyses._history import NotApplicable
from ckpt_tools.api import open_history
from ckpt_tools.store import write_result

__all__ = ["ANALYSES", "NotApplicable", "chart", "figures", "get", "names", "run"]

ANALYSES: dict[str, str] = {
    "telemetry": "ckpt_tools.analyses.telemetry",
    "evaluate": "ckpt_tools.analyses.evaluate",
    "pca": "ckpt_tools.analyses.pca",
    "spectra": "ckpt_tools.analyses.spectra",
    "compare": "ckpt_tools.analyses.compare",
}
"""Registered analyses, in the order ``ckpt analyze`` runs them."""


def names() -> list[str]:
    """The registered analysis names, in run order."""
    return list(ANALYSES)


def get(name: str) -> ModuleType:
    """The module of the analysis `name`.

    Raises:
        KeyError: no analysis of that name (the message lists the registered ones).
    """
    if name not in ANALYSES:
        raise KeyError(f"unknown analysis {name!r}; registered: {', '.join(ANALYSES)}")
    return importlib.import_module(ANALYSES[name])


def chart(name: str, result: xr.Dataset):
    """The analysis' own chart of `result`, or None when it defines none."""
    draw = getattr(get(name), "chart", None)
    return draw(result) if draw is not None else None


def figures(name: str, results: Mapping[str, xr.Dataset], **options) -> dict:
    """Named charts of the analysis `name` for several runs' results (``{run: result}``).

    The module's ``figures(results, **options)`` when it defines one; else its
    ``chart(result)`` for each run (named by the run); else no charts.
    """
    module = get(name)
    if not results:
        return {}
    draw = getattr(module, "figures", None)
    if draw is not None:
        return draw(results, **options)
    if getattr(module, "chart", None) is None:
        return {}
    return {(name if len(results) == 1 else f"{name}-{run}"): module.chart(result)
            for run, result in results.items()}


def run(
    path: str | Path,
    name: str,
    *,
    group: str = "train",
    options: Mapping | None = None,
) -> xr.Dataset:
    """Compute the analysis `name` on the history `group` and store it in the same store.

    The result replaces any previous one whole (see `ckpt_tools.store.write_result`).

    Raises:
        KeyError: unknown analysis.
        NotApplicable: the analysis does not apply to this history.
        StoreError: the store or the history is missing.
    """
    module = get(name)
    result = module.compute(open_history(path, group), **dict(options or {}))
    write_result(path, name, result, group=group)
    return result
