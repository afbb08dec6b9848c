"""The compiled per-chunk kernel of the fused telemetry pass (numba, no GIL).

One pass over a time-major chunk (each weight's steps contiguous) computes every
telemetry sum while the weight's row is in registers: |w|, w**2, w*w0, w*wf, (w-w0)**2,
(w-wf)**2, (w_t - w_{t-1})**2 and the two opposite-sign counts. The accumulators of the
current layer (9 x steps values) stay in L1, and the loop over steps vectorises. numpy
needs about 25 passes over memory for the same sums. Compiled on first use and cached on
disk by numba (``cache=True``); ``nogil=True`` lets dask's threads run it on every core.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["chunk_sums"]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def chunk_sums(xt, w0, wf, cuts, floats, counts, first, last):
    """Per-layer sums of one chunk, written into `floats` and `counts`.

    Args:
        xt: (columns, steps) float32, unit stride along steps: the chunk, time-major.
        w0: (columns,) float32, the weights at the first recorded step.
        wf: (columns,) float32, the weights at the last recorded step.
        cuts: (segments,) int64, where each layer starts among the columns (the last one
            runs to the end), as for ``numpy.add.reduceat``.
        floats: (7, steps, segments) float64 output: sums of |w|, w**2, w*w0, w*wf,
            (w-w0)**2, (w-wf)**2, and (w_t - w_{t-1})**2 (row 0 of the last is 0).
        counts: (2, steps, segments) int64 output: #{w*w0 < 0} and #{w_t*w_{t-1} < 0}
            (row 0 of the last is 0).
        first: (columns,) float32 output: the chunk's first row (copied in the same pass;
            copying a row out of a time-major chunk alone would read all of it).
        last: (columns,) float32 output: the chunk's last row.

    Every term is computed in float64 from the float32 values (products and differences
    of two float32 are exact in float64, so a sign test on the product is exact: zero has
    no sign) and summed in float64.
    """
    c, k = xt.shape
    n = cuts.shape[0]
    acc = np.empty((7, k))
    cnt = np.empty((2, k), np.int64)
    for s in range(n):
        lo = cuts[s]
        hi = cuts[s + 1] if s + 1 < n else c
        acc[:] = 0.0
        cnt[:] = 0
        for i in range(lo, hi):
            a = np.float64(w0[i])
            b = np.float64(wf[i])
            first[i] = xt[i, 0]
            last[i] = xt[i, k - 1]
            for t in range(k):
                x = np.float64(xt[i, t])
                p = x * a
                da = x - a
                db = x - b
                acc[0, t] += abs(x)
                acc[1, t] += x * x
                acc[2, t] += p
                acc[3, t] += x * b
                acc[4, t] += da * da
                acc[5, t] += db * db
                cnt[0, t] += p < 0.0
            for t in range(1, k):
                x = np.float64(xt[i, t])
                y = np.float64(xt[i, t - 1])
                d = x - y
                acc[6, t] += d * d
                cnt[1, t] += x * y < 0.0
        for t in range(k):
            for q in range(7):
                floats[q, t, s] = acc[q, t]
            counts[0, t, s] = cnt[0, t]
            counts[1, t, s] = cnt[1, t]
