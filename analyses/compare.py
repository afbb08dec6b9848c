"""Run-to-run comparison: how far apart two histories are at the steps both recorded.

Two seeds, a dense run and one of its IMP levels, a run and its ablation: L2 distance,
cosine similarity and the share of weights with the same sign, whole network and per
layer, at every step both histories recorded. The two histories may live in one store or
in two (``ckpt analyze RUN.zarr --against OTHER.zarr[:GROUP]``); their parameter tables
must match. Definitions: ``docs/analyses.md``. One pass over both histories' chunks.
"""

from __future__ import annotations

import dask
import numpy as np
import xarray as xr
from dask import delayed

from ckpt_tools.analyses._history import (
    History,
    NotApplicable,
    as_history,
    param_table,
    select_layers,
)
from ckpt_tools.api import open_history
from ckpt_tools.store import ATTRS_KEY

__all__ = ["VARIABLES", "chart", "compute"]

_META = {  # name: (long name, units)
    "l2_distance": ("L2 distance between the two runs' weights", "weight"),
    "cosine_similarity": ("cosine similarity of the two runs' weights", "1"),
    "sign_agreement": ("fraction of weights with the same sign in both runs", "1"),
}
VARIABLES: tuple[str, ...] = tuple(_META)
"""Whole-network variables (dims ``(step,)``); each also exists as ``<name>_by_layer``."""

_SUMS = ("diff_sq", "dot", "sq_a", "sq_b", "agree")


def compute(
    history: History,
    *,
    against: History | None = None,
    against_group: str = "train",
    weights: str = "prunable",
) -> xr.Dataset:
    """Distances between `history` and `against` at the steps both recorded.

    Args:
        history: A store path (its ``train`` history), a `DataTree` node or a history
            Dataset.
        against: The other history: a store path or URL (or a ``Location``; its group
            `against_group`), a node or a Dataset.
        against_group: The group of `against` when it is a path.
        weights: ``"prunable"`` (conv and linear weights) or ``"all"`` parameters.

    Returns:
        A Dataset on ``step`` (the common steps) with `VARIABLES` (float64), and on
        ``(step, layer)`` the same per selected tensor as ``<name>_by_layer``.

    Raises:
        NotApplicable: no `against` history was given.
        ValueError: the two parameter tables differ, or the runs share no step.
    """
    if against is None:
        raise NotApplicable("no second history to compare with (ckpt analyze RUN.zarr "
                            "--against OTHER.zarr[:GROUP])")
    a = as_history(history)
    b = as_history(against) if isinstance(against, xr.Dataset | xr.DataTree) else (
        open_history(against, against_group))
    specs = param_table(a)
    if [(s.name, s.shape) for s in specs] != [(s.name, s.shape) for s in param_table(b)]:
        raise ValueError("the two histories record different parameters (names or shapes "
                         "differ); compare runs of the same model")
    steps_a, steps_b = np.asarray(a["step"].values), np.asarray(b["step"].values)
    common = np.intersect1d(steps_a, steps_b)
    if common.size == 0:
        raise ValueError("the two histories share no recorded step")
    chosen = select_layers(specs, weights)
    bounds = np.array([s.offset for s in specs] + [specs[-1].stop], dtype=np.int64)
    xa = a["params"].isel(step=np.flatnonzero(np.isin(steps_a, common))).data
    xb = b["params"].isel(step=np.flatnonzero(np.isin(steps_b, common))).data
    xb = xb.rechunk(xa.chunks)
    sums = _layer_sums(xa, xb, bounds)
    sums = {k: v[:, chosen] for k, v in sums.items()}
    sizes = np.array([specs[i].size for i in chosen], dtype=np.float64)
    out = xr.Dataset(coords={
        "step": ("step", common.astype(np.int64)),
        "layer": ("layer", [specs[i].name for i in chosen]),
        "layer_size": ("layer", sizes.astype(np.int64)),
    })
    per_layer = _metrics(sums, sizes[None, :])
    whole = _metrics({k: v.sum(axis=1) for k, v in sums.items()}, sizes.sum())
    for name, (long_name, units) in _META.items():
        attrs = {"long_name": long_name, "units": units}
        out[name] = xr.Variable(("step",), whole[name], attrs)
        out[f"{name}_by_layer"] = xr.Variable(("step", "layer"), per_layer[name], attrs)
    out.attrs[ATTRS_KEY] = {
        "analysis": "compare",
        "options": {"weights": weights, "against": _describe(against, against_group)},
    }
    return out


def _describe(against, group: str) -> str:
    if isinstance(against, xr.DataTree):
        return f"node {against.path}"
    if isinstance(against, xr.Dataset):
        return "a history Dataset"
    return f"{against}:{group}"


def _metrics(s: dict[str, np.ndarray], n) -> dict[str, np.ndarray]:
    norm = np.sqrt(s["sq_a"] * s["sq_b"])
    cosine = np.full(norm.shape, np.nan)
    np.divide(s["dot"], norm, out=cosine, where=norm > 0)
    return {
        "l2_distance": np.sqrt(s["diff_sq"]),
        "cosine_similarity": np.clip(cosine, -1, 1),
        "sign_agreement": s["agree"] / n,
    }


def _block_sums(a: np.ndarray, b: np.ndarray, cuts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer sums of one pair of chunks, float64 terms (exact for float32 inputs)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not len(cuts):
        return {k: np.zeros((a.shape[0], 0)) for k in _SUMS}
    seg = lambda v: np.add.reduceat(v, cuts, axis=1)  # noqa: E731
    return {"diff_sq": seg(np.square(a - b)), "dot": seg(a * b), "sq_a": seg(a * a),
            "sq_b": seg(b * b), "agree": seg((np.sign(a) == np.sign(b)).astype(np.float64))}


def _layer_sums(xa, xb, bounds: np.ndarray) -> dict[str, np.ndarray]:
    """(step, layer) float64 sums over all layers, one task per pair of chunks."""
    rows = np.cumsum((0, *xa.chunks[0]))
    cols = np.cumsum((0, *xa.chunks[1]))
    starts, stops = bounds[:-1], bounds[1:]
    blocks_a, blocks_b = xa.to_delayed(), xb.to_delayed()
    tasks, where = [], []
    for j in range(len(cols) - 1):
        layers = np.flatnonzero((starts < cols[j + 1]) & (stops > cols[j]) & (stops > starts))
        cuts = np.maximum(starts[layers], cols[j]) - cols[j]
        for i in range(len(rows) - 1):
            tasks.append(delayed(_block_sums)(blocks_a[i, j], blocks_b[i, j], cuts))
            where.append((i, layers))
    (results,) = dask.compute(tasks)
    acc = {k: np.zeros((rows[-1], len(bounds) - 1)) for k in _SUMS}
    for (i, layers), sums in zip(where, results, strict=True):
        for k in _SUMS:
            acc[k][rows[i]:rows[i + 1], layers] += sums[k]
    return acc


def chart(result: xr.Dataset):
    """L2 distance, cosine similarity and sign agreement of the two runs over the steps."""
    import altair as alt

    from ckpt_tools.analyses.report import charts

    other = result.attrs.get(ATTRS_KEY, {}).get("options", {}).get("against", "other run")
    panels = [
        charts.chart_metric(result, {"l2_distance": "L2 distance"}, title=f"Distance to {other}",
                            y_title="L2 distance (weight)"),
        charts.chart_metric(result, {"cosine_similarity": "cosine"},
                            title=f"Cosine similarity to {other}", y_title="cosine similarity"),
        charts.chart_metric(result, {"sign_agreement": "same sign"},
                            title=f"Sign agreement with {other}", y_title="fraction of weights",
                            y_format=".0%"),
    ]
    return alt.hconcat(*panels)
