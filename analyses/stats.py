"""Seed statistics: bootstrap confidence intervals and permutation tests.

Every experiment runs several seeds per condition; these helpers tell an effect from seed
noise. Intervals are percentile bootstrap intervals of the mean
(`scipy.stats.bootstrap`); the test is a permutation test of the difference of means
(`scipy.stats.permutation_test`, exact when the number of distinct relabellings is at
most `n_resamples`). NaN values (conditions not run) are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from scipy import stats

__all__ = ["MeanCI", "TestResult", "compare", "mean_ci", "permutation_test", "summarize"]

STATISTIC = ("mean", "low", "high")


@dataclass(frozen=True)
class MeanCI:
    """Sample mean with a bootstrap confidence interval (NaN when there are no values)."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class TestResult:
    """A permutation test: ``statistic = mean(a) - mean(b)`` and its p value."""

    statistic: float
    pvalue: float
    n_a: int
    n_b: int


TestResult.__test__ = False  # a result type, not a pytest test class


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return values[np.isfinite(values)]


def mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> MeanCI:
    """Mean of `values` and its percentile-bootstrap confidence interval.

    With one value, or values all equal, the interval is the mean itself.

    Args:
        values: The per-seed values (NaN ignored).
        confidence: Confidence level of the interval, in (0, 1).
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = _finite(values)
    if x.size == 0:
        return MeanCI(np.nan, np.nan, np.nan, 0)
    if np.all(x == x[0]):
        value = float(x[0])
        return MeanCI(value, value, value, int(x.size))
    mean = float(x.mean())
    res = stats.bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
        method="percentile", rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return MeanCI(mean, float(ci.low), float(ci.high), int(x.size))


def permutation_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 9999,
    seed: int = 0,
    alternative: str = "two-sided",
) -> TestResult:
    """Permutation test of ``mean(a) - mean(b)`` (independent samples, NaN ignored).

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
    return TestResult(float(res.statistic), float(res.pvalue), int(x.size), int(y.size))


def summarize(
    ds: xr.Dataset,
    dim: str = "seed",
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> xr.Dataset:
    """Reduce every variable of `ds` that has `dim` to its mean and confidence interval.

    Returns:
        The variables without `dim` and with a new last dimension ``statistic``
        (``"mean"``, ``"low"``, ``"high"``), plus ``<name>_count`` (how many finite
        values each cell had). Variables without `dim` are left out.
    """
    out = {}
    for name, var in ds.data_vars.items():
        if dim not in var.dims:
            continue
        moved = var.transpose(..., dim)
        flat = np.asarray(moved.values, dtype=np.float64).reshape(-1, moved.sizes[dim])
        cells = [mean_ci(row, confidence=confidence, n_resamples=n_resamples, seed=seed)
                 for row in flat]
        shape = moved.shape[:-1]
        table = np.array([[c.mean, c.low, c.high] for c in cells]).reshape(*shape, 3)
        dims = (*moved.dims[:-1], "statistic")
        out[name] = (dims, table, var.attrs)
        out[f"{name}_count"] = (moved.dims[:-1], np.array([c.n for c in cells]).reshape(shape))
    coords = {k: v for k, v in ds.coords.items() if dim not in v.dims}
    result = xr.Dataset(out, coords=coords, attrs=ds.attrs)
    return result.assign_coords(statistic=list(STATISTIC))


def compare(
    ds: xr.Dataset, var: str, a: dict, b: dict, *, dim: str = "seed", **options
) -> TestResult:
    """Permutation test between two conditions of `ds[var]`, each selected by `.sel`.

    Example: ``compare(summary, "test_accuracy", {"rewind_step": 0, "level": 5},
    {"rewind_step": 100, "level": 5})`` tests whether rewinding to 100 instead of 0
    changes the accuracy at level 5, across seeds.
    """
    x = ds[var].sel(a)
    y = ds[var].sel(b)
    for label, sel in (("a", x), ("b", y)):
        if set(sel.dims) - {dim}:
            raise ValueError(f"condition {label} leaves dimensions {sel.dims}; select all but "
                             f"{dim!r}")
    return permutation_test(x.values, y.values, **options)
