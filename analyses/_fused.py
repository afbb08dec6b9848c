"""One pass over a `(step, param)` history: every per-layer sum the telemetry needs.

Each storage chunk (up to 16 steps x 2**18 parameters) is read by the task that computes
all sums for the layers it overlaps (a layer spanning chunks is summed piecewise), so a
chunk is in memory only while its task runs: reading inside the task keeps the scheduler
from reading chunks faster than they are reduced. What leaves a task is small: the sums
(steps x layers), the traced weights, and the chunk's first and last rows, from which a
small task per pair of neighbouring chunks adds the step-to-step terms across the
boundary. Two more small tasks per column of chunks take the weights at the first and
last recorded step from the first and last chunk (the only chunks read twice). Memory in
use is a few chunks per worker thread, whatever the history's length.

Precision: every elementwise term is computed in float32 (one rounding, relative error
2**-24); within a chunk, each layer's segment is summed by numpy's pairwise summation in
float32 (at most 2**18 terms: relative error about 1e-7); these partial sums are then
accumulated in float64, so the error does not grow with the model size or the number of
chunks. Counts are exact integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask import delayed
from dask.delayed import Delayed

__all__ = ["LayerSums", "layer_sums"]


@dataclass(frozen=True)
class LayerSums:
    """Per-step, per-layer sums over a history (float64 arrays of shape (step, layer)).

    With ``w`` the weights at a step, ``w0``/``wf`` those at the first/last recorded
    step and ``wp`` those at the previous recorded step, summed over each layer:
    ``abs`` = sum |w|, ``sq`` = sum w**2, ``init_dot`` = sum w * w0, ``final_dot`` =
    sum w * wf, ``init_sq`` = sum (w - w0)**2, ``final_sq`` = sum (w - wf)**2,
    ``init_flips`` = #{w * w0 < 0}, ``step_sq`` = sum (w - wp)**2 and ``step_flips`` =
    #{w * wp < 0} (the last two NaN at the first step). ``traces`` is (step, trace)
    float32: the traced weights' values.
    """

    abs: np.ndarray
    sq: np.ndarray
    init_dot: np.ndarray
    final_dot: np.ndarray
    init_sq: np.ndarray
    final_sq: np.ndarray
    init_flips: np.ndarray
    step_sq: np.ndarray
    step_flips: np.ndarray
    traces: np.ndarray


_ROW_SUMS = ("abs", "sq", "init_dot", "final_dot", "init_sq", "final_sq", "init_flips")
_STEP_SUMS = ("step_sq", "step_flips")


def _segments(bounds: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The layers overlapping columns [lo, hi) and where each starts inside them."""
    starts, stops = bounds[:-1], bounds[1:]
    layers = np.flatnonzero((starts < hi) & (stops > lo) & (stops > starts))
    return np.maximum(starts[layers], lo) - lo, layers


def _sq_diff(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.subtract(a, b, out=out)
    return np.multiply(out, out, out=out)


def _opposite(neg_a, pos_a, neg_b, pos_b) -> np.ndarray:
    """Strictly opposite signs (zeros have no sign)."""
    return (neg_a & pos_b) | (pos_a & neg_b)


def _count(flags: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    # int32 counts are several times faster than int64 and exact below 2**31 per row.
    dtype = np.int32 if flags.shape[1] < 2**31 else np.int64
    return np.add.reduceat(flags.view(np.uint8), cuts, axis=1, dtype=dtype)


class _Chunk:
    """One chunk of a dask array, read when called: inside the task that reduces it."""

    def __init__(self, chunk: Delayed):
        self.chunk = chunk

    def __call__(self) -> np.ndarray:
        return np.asarray(self.chunk.compute(scheduler="sync"), dtype=np.float32)


def _block(chunk, w0, wf, cuts, trace_cols):
    """All sums of one chunk (k steps, c params); `w0`/`wf` are its columns' slices."""
    x = chunk()
    tmp = np.empty_like(x)
    f64 = np.float64

    def seg(values):
        return np.add.reduceat(values, cuts, axis=1).astype(f64)

    with np.errstate(over="ignore", invalid="ignore"):
        neg, pos = x < 0, x > 0
        sums = {
            "abs": seg(np.abs(x, out=tmp)),
            "sq": seg(np.multiply(x, x, out=tmp)),
            "init_dot": seg(np.multiply(x, w0, out=tmp)),
            "final_dot": seg(np.multiply(x, wf, out=tmp)),
            "init_sq": seg(_sq_diff(x, w0, tmp)),
            "final_sq": seg(_sq_diff(x, wf, tmp)),
            "init_flips": _count(_opposite(neg, pos, w0 < 0, w0 > 0), cuts).astype(f64),
        }
        if len(x) > 1:
            sums["step_sq"] = seg(_sq_diff(x[1:], x[:-1], tmp[1:]))
            flips = _opposite(neg[1:], pos[1:], neg[:-1], pos[:-1])
            sums["step_flips"] = _count(flips, cuts).astype(f64)
    sums["traces"] = x[:, trace_cols]
    return sums, (x[0].copy(), x[-1].copy())


def _boundary(before, after, cuts):
    """Step-to-step sums between the last row of one chunk and the first of the next."""
    prev, cur = before[1][None], after[0][None]
    tmp = np.empty_like(cur)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.add.reduceat(_sq_diff(cur, prev, tmp), cuts, axis=1)
        flips = _count(_opposite(cur < 0, cur > 0, prev < 0, prev > 0), cuts)
    return sq[0].astype(np.float64), flips[0].astype(np.float64)


def _row(chunk, i):
    return chunk()[i].copy()


def layer_sums(params: da.Array, bounds: np.ndarray, trace_index: np.ndarray) -> LayerSums:
    """Compute every per-layer sum of a history in one pass over `params`.

    Args:
        params: (step, param) float32 dask array, chunks aligned with storage.
        bounds: (layer + 1,) int, layer i spans ``bounds[i]:bounds[i+1]`` along param.
        trace_index: sorted (trace,) int indices along param of the weights to trace.

    Returns:
        The sums; runs on the current dask scheduler (threads, or a distributed client).
    """
    n_steps, n_layers = params.shape[0], len(bounds) - 1
    rows = np.cumsum((0, *params.chunks[0]))
    cols = np.cumsum((0, *params.chunks[1]))
    blocks = np.vectorize(_Chunk, otypes=[object])(params.to_delayed())
    nb, ncols = blocks.shape
    layouts = [_segments(bounds, cols[j], cols[j + 1]) for j in range(ncols)]
    traces = [trace_index[(trace_index >= cols[j]) & (trace_index < cols[j + 1])] - cols[j]
              for j in range(ncols)]
    firsts = [delayed(_row)(blocks[0, j], 0) for j in range(ncols)]
    lasts = [delayed(_row)(blocks[-1, j], -1) for j in range(ncols)]
    parts, edges, joins = {}, {}, {}
    for i in range(nb):
        for j in range(ncols):
            out = delayed(_block, nout=2)(blocks[i, j], firsts[j], lasts[j], layouts[j][0],
                                          traces[j])
            parts[i, j], edges[i, j] = out[0], out[1]
            if i:
                joins[i, j] = delayed(_boundary)(edges[i - 1, j], edges[i, j], layouts[j][0])
    parts, joins = dask.compute(parts, joins)

    acc = {name: np.zeros((n_steps, n_layers)) for name in (*_ROW_SUMS, *_STEP_SUMS)}
    for name in _STEP_SUMS:
        acc[name][0] = np.nan
    for (i, j), sums in parts.items():
        layers = layouts[j][1]
        r0, r1 = rows[i], rows[i + 1]
        for name in _ROW_SUMS:
            acc[name][r0:r1, layers] += sums[name]
        for name in _STEP_SUMS:
            if name in sums:
                acc[name][r0 + 1:r1, layers] += sums[name]
    for (i, j), (sq, flips) in joins.items():
        layers = layouts[j][1]
        acc["step_sq"][rows[i], layers] += sq
        acc["step_flips"][rows[i], layers] += flips
    traced = np.concatenate(
        [np.concatenate([parts[i, j]["traces"] for j in range(ncols)], axis=1)
         for i in range(nb)], axis=0,
    ) if nb else np.zeros((0, len(trace_index)), np.float32)
    return LayerSums(**acc, traces=traced)
