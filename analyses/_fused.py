"""One pass over a `(step, param)` history: every per-layer sum the telemetry needs.

Each storage chunk (up to 16 steps x 2**18 parameters) is read by the task that computes
all sums for the layers it overlaps (a layer spanning chunks is summed piecewise), so a
chunk is in memory only while its task runs: reading inside the task keeps the scheduler
from reading chunks faster than they are reduced. What leaves a task is small: the sums
(steps x layers), the traced weights, and the chunk's first and last rows, from which a
small task per pair of neighbouring chunks adds the step-to-step terms across the
boundary. Two more small tasks per column of chunks take the weights at the first and
last recorded step from the first and last chunk (the only chunks read twice).

The chunks are reduced in windows of consecutive chunk rows, one dask computation per
window, and each window's last rows carry over to the next: dask orders the tasks of one
computation as it sees fit, and it does not run a chunk's neighbour soon after it, so in
a single computation over the whole history the boundary rows waiting for their
neighbour grew with its length (about half of them at a time: 186 MiB for a 4 GB
history). A window bounds them (`_WINDOW_BYTES`), and memory in use is a few chunks per
worker thread plus one window's boundary rows, whatever the history's length.

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
_WINDOW_BYTES = 64 << 20  # boundary rows (two float32 rows per chunk) one window may hold


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
    """All sums of one chunk (k steps, c params), its first row and its last row.

    `w0`/`wf` are the chunk's columns of the weights at the first and last step.
    """
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
    return sums, *edges


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


def _boundary(last, first, cuts):
    """Step-to-step sums between the `last` row of one chunk and the `first` of the next."""
    pair = np.stack([last, first], axis=1)  # (columns, 2): time-major
    floats, counts, _ = _kernel_sums(pair, pair[:, 0], pair[:, 1], cuts)
    return floats[_FLOAT_SUMS.index("step_sq"), 1], counts[1, 1].astype(np.float64)


def _row(chunk, i):
    return np.array(chunk()[i], dtype=np.float32)


def layer_sums(
    params: da.Array,
    bounds: np.ndarray,
    trace_index: np.ndarray,
    *,
    device: str | None = None,
    window: int | None = None,
) -> LayerSums:
    """Compute every per-layer sum of a history in one pass over `params`.

    Args:
        params: (step, param) float32 dask array, chunks aligned with storage.
        bounds: (layer + 1,) int, layer i spans ``bounds[i]:bounds[i+1]`` along param.
        trace_index: sorted (trace,) int indices along param of the weights to trace.
        device: None for the compiled CPU kernel; else a torch device (``"cuda"``)
            that reduces each chunk after the CPU decoded it.
        window: Chunk rows per dask computation (default: as many as keep their
            boundary rows within `_WINDOW_BYTES`, at least one).

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
    at = np.cumsum([0, *map(len, traces)])  # where each column's traces go in the result
    acc = {name: np.zeros((n_steps, n_layers)) for name in (*_ROW_SUMS, *_STEP_SUMS)}
    for name in _STEP_SUMS:
        acc[name][0] = np.nan
    traced = np.zeros((n_steps, len(trace_index)), np.float32)
    if nb == 0:
        return LayerSums(**acc, traces=traced)
    w0, wf = dask.compute([delayed(_row)(blocks[0, j], 0) for j in range(ncols)],
                          [delayed(_row)(blocks[-1, j], -1) for j in range(ncols)])
    size = window or max(1, _WINDOW_BYTES // (8 * max(params.shape[1], 1)))
    carry = None  # the last row of each column of chunks before the window
    for lo in range(0, nb, size):
        hi = min(lo + size, nb)
        graph = _window(blocks[lo:hi], w0, wf, [cut for cut, _ in layouts], traces, device,
                        carry)
        parts, joins, carry = dask.compute(*graph)
        for (i, j), sums in parts.items():
            layers, r0, r1 = layouts[j][1], rows[lo + i], rows[lo + i + 1]
            for name in _ROW_SUMS:
                acc[name][r0:r1, layers] += sums[name]
            for name in _STEP_SUMS:
                if name in sums:
                    acc[name][r0 + 1:r1, layers] += sums[name]
            traced[r0:r1, at[j]:at[j + 1]] = sums["traces"]
        for (i, j), (sq, flips) in joins.items():
            layers = layouts[j][1]
            acc["step_sq"][rows[lo + i], layers] += sq
            acc["step_flips"][rows[lo + i], layers] += flips
    return LayerSums(**acc, traces=traced)


def _window(blocks, w0, wf, cuts, traces, device, carry):
    """The tasks of one window of chunk rows `blocks` (rows counted from the window's).

    Returns delayed ``parts`` (sums per chunk), ``joins`` (boundary sums before each
    chunk row but the history's first) and each column's last row, carried to the next
    window; `carry` holds the previous window's (None for the first window).
    """
    nb, ncols = blocks.shape
    w0 = [delayed(w) for w in w0]  # one key per window, not a copy in every task
    wf = [delayed(w) for w in wf]
    last = [None] * ncols if carry is None else [delayed(row) for row in carry]
    parts, joins = {}, {}
    for i in range(nb):
        for j in range(ncols):
            parts[i, j], first, end = delayed(_block, nout=3)(
                blocks[i, j], w0[j], wf[j], cuts[j], traces[j], device)
            if last[j] is not None:
                joins[i, j] = delayed(_boundary)(last[j], first, cuts[j])
            last[j] = end
    return parts, joins, last
