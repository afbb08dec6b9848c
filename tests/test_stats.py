import itertools

import numpy as np
import pytest
import xarray as xr

from ckpt_tools.analyses.stats import MeanCI, compare, mean_ci, permutation_test, summarize


def test_mean_ci_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (5, 50, 500):
        x = rng.normal(2.0, 1.0, size=n)
        ci = mean_ci(x, n_resamples=2000)
        assert ci.n == n and ci.mean == pytest.approx(x.mean())
        assert ci.low < ci.mean < ci.high
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2]
    # about 2 * 1.96 / sqrt(n) for unit variance
    assert widths[2] == pytest.approx(2 * 1.96 / np.sqrt(500), rel=0.2)


def test_mean_ci_degenerate_cases():
    assert mean_ci([0.7]) == MeanCI(0.7, 0.7, 0.7, 1)
    same = mean_ci([0.7, 0.7, 0.7])
    assert (same.low, same.high, same.n) == (0.7, 0.7, 3)
    empty = mean_ci([np.nan, np.nan])
    assert empty.n == 0 and np.isnan(empty.mean)
    assert mean_ci([1.0, np.nan, 3.0]).n == 2
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], confidence=1.0)


def test_mean_ci_is_reproducible_from_its_seed():
    x = [0.1, 0.4, 0.35, 0.2, 0.9]
    assert mean_ci(x, seed=3) == mean_ci(x, seed=3)


def exact_p(a, b):
    """Two-sided exact permutation p value by enumerating every relabelling."""
    pooled, n = np.concatenate([a, b]), len(a)
    observed = abs(np.mean(a) - np.mean(b))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), n):
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        total += 1
        hits += abs(pooled[mask].mean() - pooled[~mask].mean()) >= observed - 1e-12
    return hits / total


def test_permutation_test_against_enumeration():
    a, b = np.array([0.91, 0.93, 0.92, 0.95]), np.array([0.88, 0.90, 0.89, 0.92])
    res = permutation_test(a, b)
    assert res.statistic == pytest.approx(a.mean() - b.mean())
    assert res.pvalue == pytest.approx(exact_p(a, b))


def test_permutation_test_known_cases():
    same = permutation_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.statistic == 0 and same.pvalue == pytest.approx(1.0)
    separated = permutation_test([10, 11, 12, 13, 14], [1, 2, 3, 4, 5])
    assert separated.pvalue == pytest.approx(2 / 252)  # the two extreme splits of C(10, 5)
    greater = permutation_test([10, 11, 12, 13, 14], [1, 2, 3, 4, 5], alternative="greater")
    assert greater.pvalue == pytest.approx(1 / 252)
    noise = np.random.default_rng(1)
    a, b = noise.normal(size=40), noise.normal(size=40)
    assert permutation_test(a, b, n_resamples=2000).pvalue > 0.05
    with pytest.raises(ValueError):
        permutation_test([np.nan], [1.0])


def test_summarize_reduces_seed_to_mean_low_high():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(2, 3, 4))
    values[1, 2, :] = np.nan
    ds = xr.Dataset(
        {"acc": (("rewind_step", "level", "seed"), values),
         "dense": ((), 0.9)},
        coords={"rewind_step": [0, 5], "level": [0, 1, 2], "seed": [0, 1, 2, 3]},
    )
    out = summarize(ds, n_resamples=500)
    assert out.acc.dims == ("rewind_step", "level", "statistic")
    assert list(out.statistic.values) == ["mean", "low", "high"]
    assert "dense" not in out and "seed" not in out.dims
    for i, j in itertools.product(range(2), range(3)):
        cell = out.acc.isel(rewind_step=i, level=j)
        want = mean_ci(values[i, j], n_resamples=500)
        np.testing.assert_allclose(cell.values, [want.mean, want.low, want.high])
        assert int(out.acc_count[i, j]) == want.n
    assert int(out.acc_count[1, 2]) == 0


def test_compare_selects_two_conditions():
    ds = xr.Dataset(
        {"acc": (("rewind_step", "seed"), [[0.5, 0.52, 0.51], [0.9, 0.91, 0.92]])},
        coords={"rewind_step": [0, 5], "seed": [0, 1, 2]},
    )
    res = compare(ds, "acc", {"rewind_step": 5}, {"rewind_step": 0})
    assert res.statistic == pytest.approx(0.4)
    assert res.pvalue == pytest.approx(exact_p(ds.acc[1].values, ds.acc[0].values))
    with pytest.raises(ValueError):
        compare(ds, "acc", {}, {"rewind_step": 0})
