"""Basic telemetry of a recorded history, after Frankle, Schwab & Morcos (2020), figure 2.

Every quantity is defined with formulas in ``docs/analyses.md``. All of them come from
one pass over the stored weights (`ckpt_tools.analyses._fused`), chunk by chunk, so a
history larger than memory works, locally or on a ``dask.distributed`` cluster.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from ckpt_tools.analyses._fused import LayerSums, layer_sums
from ckpt_tools.analyses._history import History, as_history, param_table, select_layers
from ckpt_tools.store import ATTRS_KEY, CHUNK_STEPS

__all__ = ["BY_LAYER", "VARIABLES", "chart", "compute", "figures"]

_PARAM_CHUNK = 1 << 18  # storage chunk width along `param` (used when params are in memory)

_META = {  # name: (long name, units)
    "sign_change_fraction": ("fraction of weights whose sign differs from step 0", "1"),
    "mean_abs_weight": ("mean absolute weight", "weight"),
    "l2_to_init": ("L2 distance to the weights at step 0", "weight"),
    "l2_to_final": ("L2 distance to the weights at the last recorded step", "weight"),
    "cosine_to_init": ("cosine similarity to the weights at step 0", "1"),
    "cosine_to_final": ("cosine similarity to the weights at the last recorded step", "1"),
    "grad_norm": ("gradient L2 norm at record time", "weight / step"),
    "sign_flips_per_step": (
        "fraction of weights flipping sign since the previous recorded step, per update",
        "1 / step"),
    "distance_per_step": (
        "L2 distance to the previous recorded step, per update", "weight / step"),
}

VARIABLES: tuple[str, ...] = (*_META, "weight_trace")
"""Whole-network variables of the result (dims ``(step,)``; ``weight_trace`` is
``(step, trace)``)."""

BY_LAYER: tuple[str, ...] = tuple(f"{name}_by_layer" for name in _META)
"""Per-layer variables of the result (dims ``(step, layer)``)."""


def compute(
    history: History,
    *,
    weights: str = "prunable",
    n_traces: int = 10,
    seed: int = 0,
    device: str = "cpu",
) -> xr.Dataset:
    """The telemetry of a recorded history.

    Args:
        history: A store path (its ``train`` history), a `DataTree` node or a history
            Dataset (e.g. ``ckpt_tools.open_history(path, group)``).
        weights: ``"prunable"`` (conv and linear weights, the default) or ``"all"``
            parameters.
        n_traces: How many individual weights to trace (chosen at random among the
            selected ones; all of them if there are fewer).
        seed: Seed of that choice.
        device: Where chunks are reduced once the CPU decoded them: ``"cpu"`` (a
            compiled kernel) or a torch device such as ``"cuda"``.

    Returns:
        A Dataset on ``step`` (the recorded steps) with the variables of `VARIABLES`
        (float64; ``weight_trace`` float32 on ``(step, trace)`` with coordinates
        ``trace_param``, the index along ``param``, and ``trace_layer``) and of
        `BY_LAYER` on ``(step, layer)``, ``layer`` being the selected tensors (with
        ``layer_size``, their number of weights).

    Raises:
        ValueError: unknown `weights`, no selected weights, negative `n_traces`, a
            history without recorded steps, or an unavailable `device`.
        StoreError: `history` is not a recorded history.
    """
    ds = as_history(history)
    specs = param_table(ds)
    chosen = select_layers(specs, weights)
    if n_traces < 0:
        raise ValueError(f"n_traces must be >= 0, got {n_traces}")
    steps = np.asarray(ds["step"].values, dtype=np.int64)
    if steps.size == 0:
        raise ValueError("the history has no recorded steps yet")
    bounds = np.array([s.offset for s in specs] + [specs[-1].stop], dtype=np.int64)
    trace_index = _choose_traces(specs, chosen, n_traces, seed)
    sums = layer_sums(_dask(ds["params"]), bounds, trace_index, device=_device(device))
    sizes = np.array([specs[i].size for i in chosen], dtype=np.float64)
    grad = np.asarray(ds["grad_norm"].isel(layer=chosen).values, dtype=np.float64)
    names = [specs[i].name for i in chosen]
    owner = np.searchsorted(bounds, trace_index, side="right") - 1
    out = xr.Dataset(
        coords={
            "step": ("step", steps),
            "layer": ("layer", names),
            "layer_size": ("layer", sizes.astype(np.int64)),
            "trace_param": ("trace", trace_index),
            "trace_layer": ("trace", [specs[i].name for i in owner]),
        },
    )
    per_layer = _metrics(_pick(sums, chosen), sizes[None, :], grad, steps)
    whole = _metrics(_total(_pick(sums, chosen)), sizes.sum(), _global_norm(grad), steps)
    for name, (long_name, units) in _META.items():
        attrs = {"long_name": long_name, "units": units}
        out[name] = xr.Variable(("step",), whole[name], attrs)
        out[f"{name}_by_layer"] = xr.Variable(("step", "layer"), per_layer[name], attrs)
    out["weight_trace"] = xr.Variable(
        ("step", "trace"), sums.traces,
        {"long_name": "value of a randomly chosen weight", "units": "weight"},
    )
    out.attrs[ATTRS_KEY] = {
        "analysis": "telemetry",
        "options": {"weights": weights, "n_traces": n_traces, "seed": seed},
        "n_weights": int(sizes.sum()),
        "init_step": int(steps[0]),
        "final_step": int(steps[-1]),
    }
    return out


def _device(device: str) -> str | None:
    """None for the CPU kernel, else the torch device string, checked."""
    if device == "cpu":
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available; "
                         "use --device cpu")
    return str(dev)


def _dask(params: xr.DataArray) -> da.Array:
    if isinstance(params.data, da.Array):
        return params.data
    return da.from_array(np.asarray(params.values), chunks=(CHUNK_STEPS, _PARAM_CHUNK))


def _choose_traces(specs, chosen, n_traces, seed) -> np.ndarray:
    """Indices along ``param`` of `n_traces` distinct selected weights, drawn uniformly."""
    sizes = np.array([specs[i].size for i in chosen], dtype=np.int64)
    offsets = np.array([specs[i].offset for i in chosen], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes  # where each chosen tensor starts among the selected
    n = min(n_traces, int(sizes.sum()))
    picked = np.random.default_rng(seed).choice(int(sizes.sum()), size=n, replace=False)
    owner = np.searchsorted(starts, picked, side="right") - 1
    return np.sort(offsets[owner] + picked - starts[owner]).astype(np.int64)


def _pick(sums: LayerSums, chosen: list[int]) -> dict[str, np.ndarray]:
    return {k: getattr(sums, k)[:, chosen] for k in (
        "abs", "sq", "init_dot", "final_dot", "init_sq", "final_sq", "init_flips", "step_sq",
        "step_flips")}


def _total(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.sum(axis=1) for k, v in sums.items()}


def _global_norm(grad: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(np.square(grad), axis=1))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _metrics(s: dict, n, grad: np.ndarray, steps: np.ndarray) -> dict[str, np.ndarray]:
    """The telemetry variables from sums over a set of weights of size `n`."""
    sq0, sqf = s["sq"][:1], s["sq"][-1:]
    gap = np.diff(steps, prepend=steps[0]).astype(np.float64)
    gap = gap.reshape((-1,) + (1,) * (s["sq"].ndim - 1))
    gap[0] = np.nan
    return {
        "sign_change_fraction": s["init_flips"] / n,
        "mean_abs_weight": s["abs"] / n,
        "l2_to_init": np.sqrt(s["init_sq"]),
        "l2_to_final": np.sqrt(s["final_sq"]),
        "cosine_to_init": np.clip(_ratio(s["init_dot"], np.sqrt(s["sq"] * sq0)), -1, 1),
        "cosine_to_final": np.clip(_ratio(s["final_dot"], np.sqrt(s["sq"] * sqf)), -1, 1),
        "grad_norm": grad,
        "sign_flips_per_step": s["step_flips"] / n / gap,
        "distance_per_step": np.sqrt(s["step_sq"]) / gap,
    }


def chart(result: xr.Dataset):
    """The telemetry panels of `result`, in a grid (`ckpt_tools.analyses.report.charts`)."""
    import altair as alt

    from ckpt_tools.analyses.report import charts

    panels = [
        charts.chart_mean_abs_weight(result), charts.chart_sign_changes(result),
        charts.chart_weight_traces(result), charts.chart_grad_norm(result),
        charts.chart_distance(result), charts.chart_cosine(result),
        charts.chart_sign_flips_per_step(result), charts.chart_distance_per_step(result),
    ]
    return alt.vconcat(*(alt.hconcat(*panels[i:i + 2]) for i in range(0, len(panels), 2)))


def figures(results, *, layers: bool = False) -> dict:
    """The report's telemetry figures of several runs (``{run name: result}``).

    Whole-network panels, or with `layers` one ``<name>-by-layer`` figure per per-layer
    variable (`ckpt_tools.analyses.report.charts`).
    """
    from ckpt_tools.analyses.report import charts

    return charts.layer_figures(results) if layers else charts.telemetry_figures(results)
