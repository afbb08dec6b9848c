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

Each chunk is reduced in its stored, time-major order by one compiled pass
(`ckpt_tools.analyses._kernel`, numba, without the GIL, so dask's threads use every
core), or, with ``device="cuda"``, by the same sums in torch on the GPU after the CPU
decoded the chunk (`_torch_sums`, which also runs on the CPU for the tests).

Precision: every elementwise term is computed in float64 from the float32 weights
(products and differences of two float32 are exact in float64, so the sign tests are
exact) and summed in float64; counts are exact integers. The numpy pass this replaces
rounded every term to float32 and summed in float32 within a chunk: results agree with it
to float32 rounding (``tests/test_reference.py``).
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
_FLOAT_SUMS = ("abs", "sq", "init_dot", "final_dot", "init_sq", "final_sq", "step_sq")


def _segments(bounds: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The layers overlapping columns [lo, hi) and where each starts inside them."""
    starts, stops = bounds[:-1], bounds[1:]
    layers = np.flatnonzero((starts < hi) & (stops > lo) & (stops > starts))
    return (np.maximum(starts[layers], lo) - lo).astype(np.int64), layers


class _Chunk:
    """One chunk of a dask array, read when called: inside the task that reduces it."""

    def __init__(self, chunk: Delayed):
        self.chunk = chunk

    def __call__(self) -> np.ndarray:
        return np.asarray(self.chunk.compute(scheduler="sync"), dtype=np.float32)


def _time_major(x: np.ndarray) -> np.ndarray:
    """`x` (steps, columns) as (columns, steps) with unit stride along steps.

    A chunk read from the store already is (its stored order): no copy then.
    """
    xt = x.T
    return xt if xt.strides[1] == xt.itemsize else np.ascontiguousarray(xt)


def _block(chunk, w0, wf, cuts, trace_cols, device):
    """All sums of one chunk (k steps, c params); `w0`/`wf` are its columns' slices."""
    x = chunk()
    xt = _time_major(x)
    if device is None:
        floats, counts, edges = _kernel_sums(xt, w0, wf, cuts)
    else:
        floats, counts = _torch_sums(xt, w0, wf, cuts, device)
        edges = (xt[:, 0].copy(), xt[:, -1].copy())
    sums = {name: floats[i] for i, name in enumerate(_FLOAT_SUMS) if name != "step_sq"}
    sums["init_flips"] = counts[0].astype(np.float64)
    if len(x) > 1:
        sums["step_sq"] = floats[_FLOAT_SUMS.index("step_sq"), 1:]
        sums["step_flips"] = counts[1, 1:].astype(np.float64)
    sums["traces"] = np.array(xt[trace_cols].T, dtype=np.float32)
    return sums, edges


def _kernel_sums(xt, w0, wf, cuts):
    """The compiled kernel's sums of one time-major chunk, and its first and last rows."""
    from ckpt_tools.analyses._kernel import chunk_sums

    c, k = xt.shape
    floats = np.empty((len(_FLOAT_SUMS), k, len(cuts)))
    counts = np.empty((2, k, len(cuts)), np.int64)
    first, last = np.empty(c, np.float32), np.empty(c, np.float32)
    chunk_sums(xt, w0, wf, cuts, floats, counts, first, last)
    return floats, counts, (first, last)


def _torch_sums(xt, w0, wf, cuts, device):
    """The kernel's sums with torch on `device` (float64 terms, per-layer index_add)."""
    import torch

    dev = torch.device(device)
    f64 = torch.float64
    c, k = xt.shape
    x = torch.from_numpy(np.ascontiguousarray(xt)).to(dev).to(f64)
    a = torch.from_numpy(np.ascontiguousarray(w0)).to(dev).to(f64)[:, None]
    b = torch.from_numpy(np.ascontiguousarray(wf)).to(dev).to(f64)[:, None]
    lengths = np.diff(np.append(cuts, c))
    seg = torch.repeat_interleave(torch.arange(len(cuts), device=dev),
                                  torch.from_numpy(lengths).to(dev))

    def seg_sum(v):
        out = torch.zeros((len(cuts), v.shape[1]), dtype=v.dtype, device=dev)
        return out.index_add_(0, seg, v).T  # (steps, layers)

    p = x * a
    step = torch.zeros((c, k), dtype=f64, device=dev)
    flips = torch.zeros((c, k), dtype=torch.int64, device=dev)
    step[:, 1:] = torch.square(x[:, 1:] - x[:, :-1])
    flips[:, 1:] = (x[:, 1:] * x[:, :-1] < 0).to(torch.int64)
    floats = torch.stack([seg_sum(v) for v in (
        x.abs(), x * x, p, x * b, torch.square(x - a), torch.square(x - b), step)])
    counts = torch.stack([seg_sum((p < 0).to(torch.int64)), seg_sum(flips)])
    return floats.cpu().numpy(), counts.cpu().numpy()


def _boundary(before, after, cuts):
    """Step-to-step sums between the last row of one chunk and the first of the next."""
    pair = np.stack([before[1], after[0]], axis=1)  # (columns, 2): time-major
    floats, counts, _ = _kernel_sums(pair, pair[:, 0], pair[:, 1], cuts)
    return floats[_FLOAT_SUMS.index("step_sq"), 1], counts[1, 1].astype(np.float64)


def _row(chunk, i):
    return np.array(chunk()[i], dtype=np.float32)


def layer_sums(
    params: da.Array, bounds: np.ndarray, trace_index: np.ndarray, *, device: str | None = None
) -> LayerSums:
    """Compute every per-layer sum of a history in one pass over `params`.

    Args:
        params: (step, param) float32 dask array, chunks aligned with storage.
        bounds: (layer + 1,) int, layer i spans ``bounds[i]:bounds[i+1]`` along param.
        trace_index: sorted (trace,) int indices along param of the weights to trace.
        device: None for the compiled CPU kernel; else a torch device (``"cuda"``)
            that reduces each chunk after the CPU decoded it.

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
                                          traces[j], device)
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
