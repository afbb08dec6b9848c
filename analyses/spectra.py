"""Per-layer spectra over time: singular values of every weight matrix at every step.

A conv kernel ``(out, in, k0, k1)`` is read as the ``out x (in*k0*k1)`` matrix it applies
to each input patch; a linear weight is its ``(out, in)`` matrix. From the singular
values, the stable rank ``sum(s**2) / max(s)**2`` and the effective rank
``exp(entropy(s / sum(s)))`` (Roy & Vetterli, 2007) say how many directions a layer uses
as training goes on. Definitions: ``docs/analyses.md``.

One task per stored chunk of steps and group of layers: a layer is decomposed where its
chunk is read, so memory is a chunk and its singular values, whatever the length.
"""

from __future__ import annotations

import dask
import numpy as np
import xarray as xr
from dask import delayed

from ckpt_tools.analyses._history import History, as_history, param_table, select_layers
from ckpt_tools.store import ATTRS_KEY

__all__ = ["VARIABLES", "chart", "compute"]

VARIABLES = ("singular_values", "stable_rank", "effective_rank")
"""Variables of the result: ``(step, layer, rank)``, then ``(step, layer)`` twice."""


def compute(history: History, *, weights: str = "prunable") -> xr.Dataset:
    """Singular values, stable rank and effective rank of each weight matrix at every step.

    Args:
        history: A store path (its ``train`` history), a `DataTree` node or a history
            Dataset.
        weights: ``"prunable"`` (conv and linear weights) or ``"all"``; either way only
            tensors of two or more dimensions are matrices.

    Returns:
        A Dataset on ``step`` and ``layer`` (with ``rows``/``cols``, the matrix shape) with
        ``singular_values`` ``(step, layer, rank)`` float64 in decreasing order (NaN past a
        layer's ``min(rows, cols)``), ``stable_rank`` and ``effective_rank``
        ``(step, layer)`` float64.

    Raises:
        ValueError: no selected tensor is a matrix, or the history has no steps.
    """
    ds = as_history(history)
    specs = param_table(ds)
    chosen = [i for i in select_layers(specs, weights) if len(specs[i].shape) >= 2]
    if not chosen:
        raise ValueError("the history has no weight matrices (tensors of 2 or more dims)")
    steps = np.asarray(ds["step"].values, dtype=np.int64)
    if steps.size == 0:
        raise ValueError("the history has no recorded steps yet")
    shapes = [(specs[i].shape[0], specs[i].size // specs[i].shape[0]) for i in chosen]
    rank = max(min(s) for s in shapes)
    values = _singular_values(ds["params"].data, [specs[i] for i in chosen], shapes, rank)
    out = xr.Dataset(coords={
        "step": ("step", steps),
        "layer": ("layer", [specs[i].name for i in chosen]),
        "rows": ("layer", np.array([s[0] for s in shapes], np.int64)),
        "cols": ("layer", np.array([s[1] for s in shapes], np.int64)),
        "rank": ("rank", np.arange(1, rank + 1)),
    })
    out["singular_values"] = xr.Variable(("step", "layer", "rank"), values, {
        "long_name": "singular values of the weight matrix", "units": "weight"})
    out["stable_rank"] = xr.Variable(("step", "layer"), stable_rank(values), {
        "long_name": "stable rank (sum of squared singular values / largest squared)",
        "units": "1"})
    out["effective_rank"] = xr.Variable(("step", "layer"), effective_rank(values), {
        "long_name": "effective rank (exp of the entropy of normalised singular values)",
        "units": "1"})
    out.attrs[ATTRS_KEY] = {"analysis": "spectra", "options": {"weights": weights}}
    return out


def stable_rank(s: np.ndarray) -> np.ndarray:
    """``sum(s**2) / max(s)**2`` over the last axis (NaN padding ignored; NaN if all 0)."""
    top = np.nanmax(s, axis=-1)
    num = np.nansum(np.square(s), axis=-1)
    out = np.full(num.shape, np.nan)
    np.divide(num, np.square(top), out=out, where=top > 0)
    return out


def effective_rank(s: np.ndarray) -> np.ndarray:
    """``exp(-sum(p log p))`` with ``p = s / sum(s)`` over the last axis (``0 log 0 = 0``)."""
    total = np.nansum(s, axis=-1, keepdims=True)
    p = np.divide(np.nan_to_num(s), total, out=np.zeros(s.shape), where=total > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    out = np.exp(-np.sum(p * logs, axis=-1))
    return np.where(total[..., 0] > 0, out, np.nan)


def _svals(blocks, lo: int, specs, shapes, rank) -> np.ndarray:
    """Singular values (steps, layers, rank) of `specs` in the concatenated `blocks`."""
    x = np.concatenate([np.asarray(b) for b in blocks], axis=1) if len(blocks) > 1 else (
        np.asarray(blocks[0]))
    out = np.full((x.shape[0], len(specs), rank), np.nan)
    for n, (spec, shape) in enumerate(zip(specs, shapes, strict=True)):
        m = x[:, spec.offset - lo: spec.stop - lo].astype(np.float64).reshape(-1, *shape)
        out[:, n, :min(shape)] = np.linalg.svd(m, compute_uv=False)
    return out


def _singular_values(params, specs, shapes, rank) -> np.ndarray:
    """(step, layer, rank) singular values, one task per chunk of steps and chunk span."""
    cols = np.cumsum((0, *params.chunks[1]))
    rows = np.cumsum((0, *params.chunks[0]))
    groups: dict[tuple[int, int], list[int]] = {}
    for n, spec in enumerate(specs):
        first = int(np.searchsorted(cols, spec.offset, side="right") - 1)
        last = int(np.searchsorted(cols, spec.stop - 1, side="right") - 1)
        groups.setdefault((first, last), []).append(n)
    blocks = params.to_delayed()
    tasks, where = [], []
    for (first, last), members in groups.items():
        for i in range(len(rows) - 1):
            tasks.append(delayed(_svals)(list(blocks[i, first:last + 1]), int(cols[first]),
                                         [specs[n] for n in members],
                                         [shapes[n] for n in members], rank))
            where.append((i, members))
    (results,) = dask.compute(tasks)
    out = np.full((rows[-1], len(specs), rank), np.nan)
    for (i, members), values in zip(where, results, strict=True):
        out[rows[i]:rows[i + 1], members] = values
    return out


def chart(result: xr.Dataset):
    """Stable rank and effective rank of each layer over the steps, side by side."""
    import altair as alt

    from ckpt_tools.analyses.report import charts

    return alt.hconcat(charts.chart_by_layer(result, "stable_rank"),
                       charts.chart_by_layer(result, "effective_rank"))
