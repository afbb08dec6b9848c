"""Trajectory PCA, per-layer spectra and run-to-run comparison against slow references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import ckpt_tools
from ckpt_tools.analyses import compare, pca, registry, spectra
from ckpt_tools.synthetic import synthetic_specs, write_synthetic_history


def raw(path, group="train"):
    g = zarr.open_group(str(path / group), mode="r")
    keep = np.asarray(g["committed"][:], dtype=bool)
    return (np.asarray(g["step"][:])[keep], np.asarray(g["params"][:])[keep].astype(np.float64),
            g.attrs["ckpt_tools"]["params"])


def columns(layers, prunable=True):
    return [(p["name"], p["shape"], np.arange(p["offset"], p["offset"] + math.prod(p["shape"])))
            for p in layers if p["prunable"] or not prunable]


# -- trajectory PCA -------------------------------------------------------------------

def exact_pca(w, k):
    """numpy's full SVD of the centred trajectory."""
    c = w - w.mean(axis=0)
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    proj = u[:, :k] * s[:k]
    proj *= np.where(proj[-1] - proj[0] < 0, -1, 1)
    return proj, s[:k], np.sum(c**2)


def test_pca_matches_the_exact_svd(tiny_run):
    steps, w, layers = raw(tiny_run)
    cols = np.concatenate([c for _, _, c in columns(layers)])
    got = pca.compute(tiny_run, n_components=4)
    proj, s, total = exact_pca(w[:, cols], 4)
    np.testing.assert_array_equal(got["step"], steps)
    np.testing.assert_allclose(got["total_variance"], total, rtol=1e-10)
    np.testing.assert_allclose(got["singular_value"], s, rtol=1e-6)
    np.testing.assert_allclose(got["explained_variance_ratio"], s**2 / total, rtol=1e-6)
    np.testing.assert_allclose(got["projection"], proj, rtol=1e-4, atol=1e-6 * s[0])
    # training moves in a small subspace: the first directions hold most of the variance
    assert got["explained_variance_ratio"].sum() > 0.5


def test_pca_by_layer_and_step_range(tiny_run):
    steps, w, layers = raw(tiny_run)
    got = pca.compute(tiny_run, n_components=2, start=5, stop=30, by_layer=True)
    sel = (steps >= 5) & (steps <= 30)
    np.testing.assert_array_equal(got["step"], steps[sel])
    for n, (name, _, cols) in enumerate(columns(layers)):
        proj, s, total = exact_pca(w[sel][:, cols], 2)
        np.testing.assert_allclose(got["singular_value_by_layer"][n], s, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(got["projection_by_layer"][:, n], proj, rtol=1e-4,
                                   atol=1e-6 * s[0], err_msg=name)
    with pytest.raises(ValueError, match="at least two"):
        pca.compute(tiny_run, start=3, stop=3)


# -- spectra --------------------------------------------------------------------------

def test_spectra_match_torch_svdvals_of_each_matrix(tiny_run):
    steps, w, layers = raw(tiny_run)
    got = spectra.compute(ckpt_tools.open_history(tiny_run).chunk(step=5, param=700))
    mats = [(name, shape, cols) for name, shape, cols in columns(layers) if len(shape) >= 2]
    assert got["layer"].values.tolist() == [m[0] for m in mats]
    for n, (name, shape, cols) in enumerate(mats):
        for t in range(len(steps)):
            m = torch.from_numpy(w[t, cols].reshape(shape[0], -1))
            s = torch.linalg.svdvals(m).numpy()
            np.testing.assert_allclose(got["singular_values"][t, n, :len(s)], s, rtol=1e-10,
                                       err_msg=name)
            assert np.isnan(got["singular_values"][t, n, len(s):]).all()
            assert got["stable_rank"][t, n] == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-12)
            p = s / s.sum()
            assert got["effective_rank"][t, n] == pytest.approx(
                math.exp(-np.sum(p * np.log(p))), rel=1e-12)


def test_rank_measures_on_known_spectra():
    s = np.array([[3.0, 0.0, np.nan], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(spectra.stable_rank(s), [1.0, 3.0])
    np.testing.assert_allclose(spectra.effective_rank(s), [1.0, 3.0])


# -- run-to-run comparison ------------------------------------------------------------

@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    specs = synthetic_specs(3000, layer_size=600)
    a = write_synthetic_history(folder / "a.zarr", n_steps=40, specs=specs, seed=1,
                                step_size=0.05)
    b = write_synthetic_history(folder / "b.zarr", n_steps=30, specs=specs, seed=2,
                                step_size=0.05)
    return a, b


def test_compare_matches_a_direct_computation(two_seeds):
    a, b = two_seeds
    sa, wa, layers = raw(a)
    sb, wb, _ = raw(b)
    got = compare.compute(a, against=b, weights="all")
    np.testing.assert_array_equal(got["step"], np.intersect1d(sa, sb))
    x, y = wa[:30], wb[:30]
    for n, (name, _, cols) in enumerate([(None, None, np.arange(wa.shape[1]))]
                                       + columns(layers, prunable=False)):
        suffix = "" if name is None else "_by_layer"
        pick = (lambda v: v) if name is None else (lambda v, n=n: v[:, n - 1])
        xa, yb = x[:, cols], y[:, cols]
        np.testing.assert_allclose(pick(got["l2_distance" + suffix].values),
                                   np.linalg.norm(xa - yb, axis=1), rtol=1e-12)
        cos = np.sum(xa * yb, 1) / np.linalg.norm(xa, axis=1) / np.linalg.norm(yb, axis=1)
        np.testing.assert_allclose(pick(got["cosine_similarity" + suffix].values), cos,
                                   rtol=1e-10)
        np.testing.assert_array_equal(pick(got["sign_agreement" + suffix].values),
                                      np.mean(np.sign(xa) == np.sign(yb), axis=1))
    # different seeds start apart; a run against itself is at distance 0, cosine 1
    assert got["sign_agreement"][0] < 0.6
    same = compare.compute(a, against=ckpt_tools.open_history(a))
    assert (same["l2_distance"] == 0).all() and (same["sign_agreement"] == 1).all()


def test_compare_refuses_what_it_cannot_compare(two_seeds, tiny_run):
    a, _ = two_seeds
    with pytest.raises(registry.NotApplicable, match="--against"):
        compare.compute(a)
    with pytest.raises(ValueError, match="different parameters"):
        compare.compute(a, against=tiny_run)


def test_analyses_are_registered_and_charted(tiny_copy):
    for name in ("pca", "spectra"):
        result = registry.run(tiny_copy, name)
        assert isinstance(registry.chart(name, result).to_dict(), dict)
    result = registry.run(tiny_copy, "compare", options={"against": tiny_copy})
    xr.testing.assert_equal(result["l2_distance"], xr.zeros_like(result["l2_distance"]))
    assert isinstance(registry.chart("compare", result).to_dict(), dict)
