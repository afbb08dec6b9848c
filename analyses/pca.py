"""Trajectory PCA: the few directions the weights move along, and every step's position.

Gradient descent moves in a tiny subspace early on; this view shows it. The recorded
weights ``w_t`` of a step range, centred on their mean over those steps, form a
``steps x weights`` matrix whose top singular vectors are the principal directions of
the trajectory. Each step's projection on them, and the share of the trajectory's
variance each explains, are the result (definitions in ``docs/analyses.md``).

Computed blockwise with dask's randomised SVD (`dask.array.linalg.svd_compressed`, with
power iterations) over the stored chunks: every pass re-reads the chunks instead of
holding the history, so memory is a few chunks plus ``(components + oversampling) x
weights`` floats, whatever the length. ``by_layer=True`` does the same for each tensor.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ckpt_tools.analyses._history import History, as_history, param_table, select_layers
from ckpt_tools.store import ATTRS_KEY

__all__ = ["chart", "compute", "trajectory_pca"]


def compute(
    history: History,
    *,
    n_components: int = 5,
    start: int | None = None,
    stop: int | None = None,
    weights: str = "prunable",
    by_layer: bool = False,
    n_power_iter: int = 4,
    n_oversamples: int = 10,
    seed: int = 0,
) -> xr.Dataset:
    """Principal directions of the weight trajectory over the recorded steps.

    Args:
        history: A store path (its ``train`` history), a `DataTree` node or a history
            Dataset.
        n_components: How many principal directions (at most the number of steps).
        start: First recorded step to include (default: the first).
        stop: Last recorded step to include (default: the last).
        weights: ``"prunable"`` (conv and linear weights) or ``"all"`` parameters.
        by_layer: Also decompose each selected tensor's own trajectory.
        n_power_iter: Power iterations of the randomised SVD (more: more exact).
        n_oversamples: Extra random directions of the randomised SVD.
        seed: Seed of its random directions.

    Returns:
        A Dataset on ``step`` (the steps used) and ``component`` (1, 2, ...) with
        ``projection`` ``(step, component)``: each step's coordinates along the
        directions; ``singular_value`` and ``explained_variance_ratio``
        ``(component,)``; ``total_variance`` (scalar: the sum of squared distances of the
        steps to their mean). With `by_layer`, the same per tensor as
        ``projection_by_layer`` ``(step, layer, component)`` etc. (NaN past a tensor's
        rank). Each direction's sign is chosen so that the last step projects higher
        than the first. float64.

    Raises:
        ValueError: fewer than two steps in the range, unknown `weights`, or
            `n_components` < 1.
    """
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    ds = as_history(history)
    specs = param_table(ds)
    chosen = select_layers(specs, weights)
    steps = np.asarray(ds["step"].values, dtype=np.int64)
    keep = np.flatnonzero((steps >= (steps.min(initial=0) if start is None else start))
                          & (steps <= (steps.max(initial=0) if stop is None else stop)))
    if keep.size < 2:
        raise ValueError(f"trajectory PCA needs at least two recorded steps in the range; "
                         f"{keep.size} selected")
    if keep[-1] - keep[0] + 1 == keep.size:
        keep = slice(int(keep[0]), int(keep[-1]) + 1)
    params = ds["params"].isel(step=keep).data
    k = min(n_components, params.shape[0])
    options = {"n_power_iter": n_power_iter, "n_oversamples": n_oversamples, "seed": seed}
    whole = da.concatenate([params[:, specs[i].offset:specs[i].stop] for i in chosen], axis=1)
    proj, svals, total = trajectory_pca(whole, k, **options)
    out = xr.Dataset(coords={"step": ("step", steps[keep]),
                             "component": ("component", np.arange(1, k + 1))})
    _put(out, "", ("step", "component"), proj, svals, total)
    if by_layer:
        per = [trajectory_pca(params[:, specs[i].offset:specs[i].stop], k, **options)
               for i in chosen]
        out = out.assign_coords(layer=("layer", [specs[i].name for i in chosen]))
        _put(out, "_by_layer", ("step", "layer", "component"),
             np.stack([p[0] for p in per], axis=1), np.stack([p[1] for p in per]),
             np.array([p[2] for p in per]))
    out.attrs[ATTRS_KEY] = {"analysis": "pca", "options": {
        "n_components": n_components, "start": start, "stop": stop, "weights": weights,
        "by_layer": by_layer, **options}}
    return out


def _put(out: xr.Dataset, suffix: str, dims, proj, svals, total) -> None:
    lead = dims[1:-1]
    ratio = np.square(svals) / np.asarray(total)[(..., None)]
    out["projection" + suffix] = xr.Variable(dims, proj, {
        "long_name": "coordinate of each step along the principal direction",
        "units": "weight"})
    out["singular_value" + suffix] = xr.Variable((*lead, "component"), svals, {
        "long_name": "singular value of the centred trajectory", "units": "weight"})
    out["explained_variance_ratio" + suffix] = xr.Variable((*lead, "component"), ratio, {
        "long_name": "share of the trajectory's variance along the direction", "units": "1"})
    out["total_variance" + suffix] = xr.Variable(lead, total, {
        "long_name": "sum of squared distances of the steps to their mean",
        "units": "weight**2"})


def trajectory_pca(
    x: da.Array, k: int, *, n_power_iter: int = 4, n_oversamples: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-`k` principal components of the rows of `x` (steps x weights), blockwise.

    Returns:
        ``(projection (steps, k), singular values (k,), total variance)``, float64;
        components past the rank of the centred rows are NaN.
    """
    x = x.astype(np.float64)
    mean = x.mean(axis=0).compute()  # one pass; the centring is then lazy per block
    centred = x - mean
    total = float(da.square(centred).sum().compute())
    k_eff = min(k, x.shape[0] - 1, x.shape[1])
    proj = np.full((x.shape[0], k), np.nan)
    svals = np.full(k, np.nan)
    if k_eff < 1 or total == 0:
        return proj, svals, total
    u, s, _ = da.linalg.svd_compressed(
        centred, k_eff, n_power_iter=n_power_iter, n_oversamples=n_oversamples, seed=seed,
        compute=True)
    u, s = dask.compute(u, s)
    p = u * s
    flip = np.where(p[-1] - p[0] < 0, -1.0, 1.0)
    proj[:, :k_eff], svals[:k_eff] = p * flip, s
    return proj, svals, total


def chart(result: xr.Dataset):
    """Explained variance by component, and the trajectory in the first two directions."""
    import altair as alt

    ratio = result["explained_variance_ratio"].to_dataframe().reset_index()
    bars = alt.Chart(ratio).mark_bar().encode(
        x=alt.X("component:O", title="principal direction"),
        y=alt.Y("explained_variance_ratio:Q", title="share of variance",
                axis=alt.Axis(format=".0%")),
        tooltip=["component:O", alt.Tooltip("explained_variance_ratio:Q", format=".3%")],
    ).properties(title="Trajectory PCA: explained variance")
    proj = result["projection"]
    second = 2 if proj.sizes["component"] > 1 else 1
    rows = [{"step": int(s), "pc1": float(a), "pc2": float(b)} for s, a, b in zip(
        result["step"].values, proj.sel(component=1).values,
        proj.sel(component=second).values, strict=True) if np.isfinite(a) and np.isfinite(b)]
    path = alt.Chart(alt.Data(values=rows)).mark_line(point=True).encode(
        x=alt.X("pc1:Q", title="direction 1"), y=alt.Y(f"pc{2}:Q", title=f"direction {second}"),
        order="step:Q", color=alt.Color("step:Q", scale=alt.Scale(scheme="viridis")),
        tooltip=["step:Q", alt.Tooltip("pc1:Q", format=".4g"), alt.Tooltip("pc2:Q", format=".4g")],
    ).properties(title="Trajectory in the first two principal directions")
    return alt.hconcat(bars, path)
