"""Seed statistics that hold with a handful of seeds: intervals of the mean and tests.

Every experiment runs a few seeds per condition; these helpers tell an effect from seed
noise without overstating it.

- Intervals of the mean are Student t intervals by default: they have their nominal
  coverage for any n >= 2 when the seed-to-seed spread is roughly normal. A percentile
  bootstrap does not: with 3 seeds its "95%" interval is the seeds' range, which covers
  the mean about 75% of the time. BCa (`scipy.stats.bootstrap`) is there when asked, for
  skewed values and larger n; it too under-covers with very few values.
- Two conditions measured with the same seeds are compared pair by pair (seed s of A
  against seed s of B, which share the initialisation and data order): an exact sign-flip
  permutation test of the mean paired difference, and a paired t-test. Only conditions
  that do not hold the same seeds are compared as independent samples (a permutation test
  of the difference of means and Welch's t-test), and the result says which it was.

NaN values (conditions not run) are left out; a seed whose value is NaN in either
condition drops out of a paired comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import xarray as xr
from scipy import stats

__all__ = [
    "METHODS", "MeanCI", "TestResult", "compare", "mean_ci", "paired_test",
    "permutation_test", "summarize",
]

STATISTIC = ("mean", "low", "high")
Method = Literal["t", "bca"]
METHODS: dict[str, str] = {"t": "Student t", "bca": "BCa bootstrap"}


@dataclass(frozen=True)
class MeanCI:
    """Sample mean with its confidence interval.

    Attributes:
        mean: The mean of the finite values (NaN when there are none).
        low: Lower end of the interval (NaN with fewer than two values: one value says
            nothing about the spread).
        high: Upper end of the interval.
        n: How many finite values there were.
        method: How the interval was made: ``"t"`` or ``"bca"`` (see `METHODS`).
        confidence: The interval's confidence level.
    """

    mean: float
    low: float
    high: float
    n: int
    method: str = "t"
    confidence: float = 0.95


@dataclass(frozen=True)
class TestResult:
    """A test of ``mean(a) - mean(b)`` (paired: the mean of the per-seed differences).

    Attributes:
        statistic: ``mean(a) - mean(b)``; paired, ``mean(a_s - b_s)`` over the shared seeds.
        pvalue: The permutation test's p value (exact when every relabelling or sign flip
            could be enumerated within ``n_resamples``).
        n_a: Values of A used.
        n_b: Values of B used (paired: equal to ``n_a``, the number of pairs).
        paired: Whether the values were paired by seed.
        design: One line saying which test was run and why.
        t_pvalue: The p value of the t-test (paired, or Welch's for independent samples;
            NaN when it is undefined, e.g. fewer than two pairs).
        low: Lower end of the t interval of the difference (NaN when undefined).
        high: Upper end of that interval.
    """

    statistic: float
    pvalue: float
    n_a: int
    n_b: int
    paired: bool = False
    design: str = "independent samples"
    t_pvalue: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")


TestResult.__test__ = False  # a result type, not a pytest test class


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return values[np.isfinite(values)]


def mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    method: Method = "t",
    n_resamples: int = 9999,
    seed: int = 0,
) -> MeanCI:
    """Mean of `values` and its confidence interval.

    Values all equal give a zero-width interval; fewer than two values give NaN ends.

    Args:
        values: The per-seed values (NaN ignored).
        confidence: Confidence level of the interval, in (0, 1).
        method: ``"t"``: Student t interval, ``mean +- t_{n-1} * s / sqrt(n)``.
            ``"bca"``: bias-corrected and accelerated bootstrap (`scipy.stats.bootstrap`).
        n_resamples: Bootstrap resamples (``"bca"`` only).
        seed: Seed of the resampling (``"bca"`` only).

    Raises:
        ValueError: `confidence` outside (0, 1) or an unknown `method`.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return MeanCI(np.nan, np.nan, np.nan, 0, method, confidence)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, np.nan, np.nan, 1, method, confidence)
    if np.all(x == x[0]):
        value = float(x[0])
        return MeanCI(value, value, value, n, method, confidence)
    if method == "t":
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)
        return MeanCI(mean, mean - half, mean + half, n, method, confidence)
    res = stats.bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
        method="BCa", rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return MeanCI(mean, float(ci.low), float(ci.high), n, method, confidence)


def permutation_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 9999,
    seed: int = 0,
    alternative: str = "two-sided",
) -> TestResult:
    """Tests of ``mean(a) - mean(b)`` for independent samples (NaN ignored).

    A permutation test of the difference of means (`scipy.stats.permutation_test`) and
    Welch's t-test, with Welch's t interval of the difference.

    Args:
        a: Values of condition A (one per seed).
        b: Values of condition B.
        n_resamples: Random relabellings (the test is exact when there are fewer
            distinct ones).
        seed: Seed of the relabelling.
        alternative: ``"two-sided"``, ``"greater"`` (A > B) or ``"less"``.

    Raises:
        ValueError: a sample has no finite values.
    """
    x, y = _finite(a), _finite(b)
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples need at least one finite value")

    def diff(u, v, axis):
        return np.mean(u, axis=axis) - np.mean(v, axis=axis)

    res = stats.permutation_test(
        (x, y), diff, permutation_type="independent", vectorized=True,
        n_resamples=n_resamples, alternative=alternative, rng=np.random.default_rng(seed),
    )
    t_p, low, high = np.nan, np.nan, np.nan
    if x.size >= 2 and y.size >= 2 and (x.std() > 0 or y.std() > 0):
        t = stats.ttest_ind(x, y, equal_var=False, alternative=alternative)
        t_p = float(t.pvalue)
        ci = t.confidence_interval()
        low, high = float(ci.low), float(ci.high)
    return TestResult(float(res.statistic), float(res.pvalue), int(x.size), int(y.size),
                      paired=False, design="independent samples (permutation, Welch t)",
                      t_pvalue=t_p, low=low, high=high)


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 9999,
    seed: int = 0,
    alternative: str = "two-sided",
) -> TestResult:
    """Tests of the mean paired difference ``mean(a_i - b_i)`` (pairs with a NaN dropped).

    A sign-flip permutation test: under the null each difference is as likely to have
    either sign. It enumerates all ``2**n`` sign flips (exact) whenever ``2**n <=
    n_resamples``, so up to 13 pairs by default; the smallest two-sided p value is then
    ``2 / 2**n`` (0.0625 with 5 pairs, 0.0078 with 8). Beyond that, `n_resamples` random
    flips (p = (hits + 1) / (n_resamples + 1)). Also the paired t-test and the two-sided t
    interval of the mean difference (at 95%).

    Args:
        a: Values of condition A, one per seed.
        b: Values of condition B for the same seeds, in the same order.
        n_resamples: Random sign flips when there are more than this many.
        seed: Seed of the random sign flips.
        alternative: ``"two-sided"``, ``"greater"`` (A > B) or ``"less"``.

    Raises:
        ValueError: `a` and `b` differ in length, or no pair has two finite values.
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need the same length, got {x.size} and {y.size}")
    d = (x - y)[np.isfinite(x) & np.isfinite(y)]
    if d.size == 0:
        raise ValueError("no pair has finite values in both samples")
    pvalue = _sign_flip_pvalue(d, n_resamples=n_resamples, seed=seed, alternative=alternative)
    t_p, low, high = _t_test(d, alternative)
    return TestResult(float(d.mean()), pvalue, int(d.size), int(d.size),
                      paired=True, design="paired by seed (sign-flip permutation, paired t)",
                      t_pvalue=t_p, low=low, high=high)


def _sign_flip_pvalue(d: np.ndarray, *, n_resamples: int, seed: int, alternative: str) -> float:
    n = d.size
    if 2**n <= n_resamples:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # every sign pattern, (2**n, n)
        signs, exact = 1.0 - 2.0 * bits, True
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, n))
        exact = False
    null = signs @ d / n
    observed = d.mean()
    tol = 1e-12 * max(1.0, abs(observed))  # equal statistics must count as "as extreme"
    if alternative == "two-sided":
        hits = np.count_nonzero(np.abs(null) >= abs(observed) - tol)
    elif alternative == "greater":
        hits = np.count_nonzero(null >= observed - tol)
    elif alternative == "less":
        hits = np.count_nonzero(null <= observed + tol)
    else:
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    return float(hits / null.size) if exact else float((hits + 1) / (null.size + 1))


def _t_test(d: np.ndarray, alternative: str) -> tuple[float, float, float]:
    """One-sample t-test of mean(d) = 0: p value and the two-sided 95% t interval."""
    n, sd = d.size, d.std(ddof=1) if d.size >= 2 else 0.0
    if n < 2 or sd == 0:
        return np.nan, np.nan, np.nan
    se = sd / np.sqrt(n)
    t = d.mean() / se
    p = {"two-sided": 2 * stats.t.sf(abs(t), n - 1), "greater": stats.t.sf(t, n - 1),
         "less": stats.t.cdf(t, n - 1)}[alternative]
    half = stats.t.ppf(0.975, n - 1) * se
    return float(p), float(d.mean() - half), float(d.mean() + half)


def summarize(
    ds: xr.Dataset,
    dim: str = "seed",
    *,
    confidence: float = 0.95,
    method: Method = "t",
    n_resamples: int = 9999,
    seed: int = 0,
) -> xr.Dataset:
    """Reduce every variable of `ds` that has `dim` to its mean and confidence interval.

    Returns:
        The variables without `dim` and with a new last dimension ``statistic``
        (``"mean"``, ``"low"``, ``"high"``), plus ``<name>_count`` (how many finite
        values each cell had: its n). Variables without `dim` are left out. The
        attributes ``interval`` (e.g. ``"Student t"``) and ``confidence`` say how the
        intervals were made, on the dataset and on every reduced variable.
    """
    out = {}
    how = {"interval": METHODS.get(method, method), "confidence": confidence}
    for name, var in ds.data_vars.items():
        if dim not in var.dims:
            continue
        moved = var.transpose(..., dim)
        flat = np.asarray(moved.values, dtype=np.float64).reshape(-1, moved.sizes[dim])
        cells = [mean_ci(row, confidence=confidence, method=method, n_resamples=n_resamples,
                         seed=seed) for row in flat]
        shape = moved.shape[:-1]
        table = np.array([[c.mean, c.low, c.high] for c in cells]).reshape(*shape, 3)
        dims = (*moved.dims[:-1], "statistic")
        out[name] = (dims, table, {**var.attrs, **how})
        out[f"{name}_count"] = (moved.dims[:-1], np.array([c.n for c in cells]).reshape(shape))
    coords = {k: v for k, v in ds.coords.items() if dim not in v.dims}
    result = xr.Dataset(out, coords=coords, attrs={**ds.attrs, **how})
    return result.assign_coords(statistic=list(STATISTIC))


def compare(
    ds: xr.Dataset, var: str, a: dict, b: dict, *, dim: str = "seed", **options
) -> TestResult:
    """Test between two conditions of `ds[var]`, each selected by `.sel`, across `dim`.

    When both selections hold finite values for the same values of the `dim` coordinate
    (the same seeds), they are paired by it (`paired_test`); otherwise they are compared as
    independent samples (`permutation_test`) and the result's ``design`` says so.

    Example: ``compare(summary, "test_accuracy", {"rewind_step": 100, "level": 5},
    {"rewind_step": 0, "level": 5})`` tests whether rewinding to 100 instead of 0
    changes the accuracy at level 5, seed by seed.

    Args:
        ds: Values per condition and `dim`.
        var: The variable to compare.
        a: Selection of condition A (every dimension but `dim`).
        b: Selection of condition B.
        dim: The dimension holding the seeds.
        **options: Passed to the test (``n_resamples``, ``seed``, ``alternative``).

    Raises:
        ValueError: a selection leaves a dimension other than `dim`.
    """
    x = ds[var].sel(a)
    y = ds[var].sel(b)
    for label, sel in (("a", x), ("b", y)):
        if set(sel.dims) - {dim}:
            raise ValueError(f"condition {label} leaves dimensions {sel.dims}; select all but "
                             f"{dim!r}")
    if x.dims == (dim,) and y.dims == (dim,) and dim in x.coords and dim in y.coords:
        held_x = x[dim].values[np.isfinite(x.values)].tolist()
        held_y = y[dim].values[np.isfinite(y.values)].tolist()
        if held_x and len(set(held_x)) == len(held_x) and set(held_x) == set(held_y):
            return paired_test(x.sel({dim: held_x}).values, y.sel({dim: held_x}).values,
                               **options)
    result = permutation_test(x.values, y.values, **options)
    return TestResult(**{**result.__dict__,
                         "design": f"independent samples: the conditions do not hold the same "
                                   f"{dim} values (permutation, Welch t)"})
