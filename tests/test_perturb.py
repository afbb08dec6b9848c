"""Ablations at step k: each invariant checked directly, and `ckpt ablate` end to end."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from ckpt_tools import load_state_dict
from ckpt_tools.analyses.experiments import perturb
from ckpt_tools.analyses.experiments.ablate import ablation_group, read_ablation_summary
from ckpt_tools.analyses.experiments.imp import read_summary
from ckpt_tools.analyses.experiments.perturb import ABLATIONS, Start
from ckpt_tools.analyses.experiments.pruning import param_table, read_mask
from ckpt_tools.analyses.report import ablation_charts, gather_experiments, sections
from ckpt_tools.cli.app import app
from ckpt_tools.tensors import TensorSpec


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0.1, 0.5, (6, 4, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(-0.2, 1.0, (5, 12)).astype(np.float32),
    }


def _mask(seed: int = 9, keep: float = 0.4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.random(w.shape) < keep for n, w in _weights(0).items()}


W0, WK, MASK = _weights(1), _weights(2), _mask()


def _structures(w: np.ndarray, within: str) -> np.ndarray:
    """Independent reference: (groups, elements) view by explicit slicing."""
    if within == "layer":
        return w.reshape(1, -1)
    if within == "filter":
        return np.stack([w[o].ravel() for o in range(w.shape[0])])
    if w.ndim == 2:  # a linear layer: every weight is its own 1x1 kernel
        return w.reshape(-1, 1)
    return np.stack([w[o, i].ravel() for o in range(w.shape[0]) for i in range(w.shape[1])])


@pytest.mark.parametrize("within", ["layer", "filter", "kernel"])
@pytest.mark.parametrize("keep_signs", [False, True])
def test_permute_keeps_multiset_in_each_structure(within, keep_signs):
    out = perturb.permute(WK, MASK, within=within, keep_signs=keep_signs, seed=3)
    for name, m in MASK.items():
        w, o = WK[name], out[name]
        assert o.dtype == np.float32 and o.shape == w.shape
        assert np.all(o[~m] == 0)
        for wg, og, mg in zip(
            _structures(w, within), _structures(o, within), _structures(m, within), strict=True
        ):
            if keep_signs:
                np.testing.assert_array_equal(np.sign(og[mg]), np.sign(wg[mg]))
                np.testing.assert_array_equal(np.sort(np.abs(og[mg])), np.sort(np.abs(wg[mg])))
            else:
                np.testing.assert_array_equal(np.sort(og[mg]), np.sort(wg[mg]))


@pytest.mark.parametrize("within", ["layer", "filter"])
def test_permute_actually_moves_values_and_is_seeded(within):
    a = perturb.permute(WK, MASK, within=within, seed=1)
    b = perturb.permute(WK, MASK, within=within, seed=1)
    c = perturb.permute(WK, MASK, within=within, seed=2)
    for name in MASK:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
        assert np.mean(a[name][MASK[name]] == WK[name][MASK[name]]) < 0.5


def test_permute_kernel_leaves_linear_layers_unchanged():
    out = perturb.permute(WK, MASK, within="kernel", seed=1)
    masked = {n: np.where(m, WK[n], 0) for n, m in MASK.items()}
    np.testing.assert_array_equal(out["fc.weight"], masked["fc.weight"])
    assert not np.array_equal(out["conv.weight"], masked["conv.weight"])


def test_permutation_is_uniform_over_positions():
    # One value among 4 unpruned positions of a filter lands at each with frequency ~1/4.
    w = {"w": np.array([[5.0, 1.0, 0.0, 2.0, 3.0, 0.0]], dtype=np.float32)}
    m = {"w": np.array([[True, True, False, True, True, False]])}
    hits = np.zeros(6)
    for seed in range(2000):
        hits += perturb.permute(w, m, within="filter", seed=seed)["w"][0] == 5.0
    assert hits[2] == hits[5] == 0
    np.testing.assert_allclose(hits[[0, 1, 3, 4]] / 2000, 0.25, atol=0.04)


@pytest.mark.parametrize(
    ("kind", "signs", "mags"),
    [
        ("signs_k_mags_k", WK, WK),
        ("signs_k_mags_0", WK, W0),
        ("signs_0_mags_k", W0, WK),
        ("signs_0_mags_0", W0, W0),
    ],
)
def test_sign_magnitude_recombination(kind, signs, mags):
    result = ABLATIONS[kind](Start(W0, WK, MASK), seed=0)
    for name, m in MASK.items():
        o = result.weights[name]
        assert np.all(o[~m] == 0)
        np.testing.assert_array_equal(np.sign(o[m]), np.sign(signs[name][m]))
        np.testing.assert_array_equal(np.abs(o[m]), np.abs(mags[name][m]))
        np.testing.assert_array_equal(result.mask[name], m)


def test_rewinding_is_the_weights_at_k():
    result = ABLATIONS["signs_k_mags_k"](Start(W0, WK, MASK))
    for name, m in MASK.items():
        np.testing.assert_array_equal(result.weights[name], np.where(m, WK[name], 0))


def test_init_std_matches_torch_kaiming_normal():
    torch.manual_seed(0)
    for shape in [(64, 32, 3, 3), (300, 784), (512, 16, 1, 1)]:
        t = torch.empty(shape)
        torch.nn.init.kaiming_normal_(t)
        assert abs(t.std().item() / perturb.init_std(shape) - 1) < 0.03


def test_signs_k_with_fresh_init_magnitudes():
    big = {"w": np.random.default_rng(0).normal(0, 3.0, (128, 64, 3, 3)).astype(np.float32)}
    m = {"w": np.random.default_rng(1).random(big["w"].shape) < 0.5}
    out = ABLATIONS["signs_k_mags_init"](Start(big, big, m), seed=4).weights["w"]
    np.testing.assert_array_equal(np.sign(out[m["w"]]), np.sign(big["w"][m["w"]]))
    assert np.all(out[~m["w"]] == 0)
    std = perturb.init_std(big["w"].shape)
    # |N(0, s)| has mean s * sqrt(2 / pi) and second moment s^2.
    mags = np.abs(out[m["w"]]).astype(np.float64)
    assert abs(mags.mean() / (std * np.sqrt(2 / np.pi)) - 1) < 0.02
    assert abs(np.sqrt(np.mean(mags**2)) / std - 1) < 0.02


def _big(mean: float, std: float) -> tuple[dict, dict]:
    w = {"w": np.random.default_rng(5).normal(mean, std, (256, 128, 3, 3)).astype(np.float32)}
    return w, {"w": np.random.default_rng(6).random(w["w"].shape) < 0.3}


def test_gaussian_reinit_matches_layer_moments():
    w, m = _big(0.05, 0.2)
    kept = w["w"][m["w"]].astype(np.float64)
    out = ABLATIONS["gaussian"](Start(w, w, m), seed=2).weights["w"]
    new = out[m["w"]].astype(np.float64)
    n = new.size
    assert abs(new.mean() - kept.mean()) < 4 * kept.std() / np.sqrt(n)
    assert abs(new.std() / kept.std() - 1) < 4 / np.sqrt(2 * n)
    assert np.all(out[~m["w"]] == 0)
    assert np.mean(new == kept) < 1e-3


def test_gaussian_with_signs_is_the_same_draw_with_the_signs_at_k():
    w, m = _big(0.05, 0.2)
    plain = perturb.gaussian_reinit(w, m, seed=2)["w"]
    signed = perturb.gaussian_reinit(w, m, keep_signs=True, seed=2)["w"]
    np.testing.assert_array_equal(signed, np.where(m["w"], np.sign(w["w"]) * np.abs(plain), 0))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_noise_std_is_alpha_times_layer_std(alpha):
    w, m = _big(0.0, 0.3)
    out = perturb.add_noise(w, m, alpha=alpha, seed=1)["w"]
    noise = (out - w["w"])[m["w"]].astype(np.float64)
    target = alpha * w["w"][m["w"]].astype(np.float64).std()
    if alpha == 0:
        assert np.abs(noise).max() < 1e-6
    else:
        assert abs(noise.std() / target - 1) < 0.02
        assert abs(noise.mean()) < 0.02 * target
    assert np.all(out[~m["w"]] == 0)


def test_noise_rejects_negative_alpha():
    with pytest.raises(ValueError, match="alpha"):
        perturb.add_noise(WK, MASK, alpha=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        perturb.add_noise_norm_matched(WK, MASK, alpha=-1.0)


@pytest.mark.parametrize("alpha", [0.5, 1.414, 3.0])
def test_norm_matched_noise_keeps_each_layer_norm_and_the_plain_noise_direction(alpha):
    plain = perturb.add_noise(WK, MASK, alpha=alpha, seed=4)
    matched = ABLATIONS["noise_norm_matched"](Start(W0, WK, MASK), seed=4, alpha=alpha).weights
    for name, m in MASK.items():
        keep = torch.from_numpy(m)
        at_k = torch.linalg.vector_norm(torch.from_numpy(WK[name]).double() * keep)
        new = torch.from_numpy(matched[name]).double()
        noisy = torch.from_numpy(plain[name]).double()
        # the norm at k, to float32 rounding, where the plain noise moved it
        assert float(torch.linalg.vector_norm(new)) == pytest.approx(float(at_k), rel=1e-6)
        assert float(torch.linalg.vector_norm(noisy)) > 1.02 * float(at_k)
        # the same direction as the plain noise of the same seed
        torch.testing.assert_close(new / torch.linalg.vector_norm(new),
                                   noisy / torch.linalg.vector_norm(noisy), rtol=0, atol=1e-6)
        assert torch.all(new[~keep] == 0)


def test_norm_matched_noise_of_alpha_zero_is_rewinding():
    out = perturb.add_noise_norm_matched(WK, MASK, alpha=0.0, seed=1)
    for name, m in MASK.items():
        np.testing.assert_allclose(out[name], np.where(m, WK[name], 0), rtol=1e-6, atol=0)


def test_random_reinit_is_fresh_init_distribution():
    _, m = _big(0, 1)
    out = ABLATIONS["random_reinit"](Start({}, {}, m), seed=3)
    std = perturb.init_std(m["w"].shape)
    new = out.weights["w"][m["w"]].astype(np.float64)
    assert abs(new.std() / std - 1) < 0.02 and abs(new.mean()) < 0.02 * std
    assert np.all(out.weights["w"][~m["w"]] == 0)
    other = ABLATIONS["random_reinit"](Start({}, {}, m), seed=4).weights["w"]
    assert not np.array_equal(other, out.weights["w"])


def test_random_mask_keeps_per_layer_counts_and_weights_at_k():
    result = ABLATIONS["random_mask"](Start(W0, WK, MASK), seed=5)
    for name, m in MASK.items():
        new = result.mask[name]
        assert new.dtype == bool and new.shape == m.shape
        assert new.sum() == m.sum()
        assert not np.array_equal(new, m)
        np.testing.assert_array_equal(result.weights[name], np.where(new, WK[name], 0))


@pytest.mark.parametrize("kind", sorted(ABLATIONS))
def test_every_ablation_keeps_pruned_entries_zero(kind):
    result = ABLATIONS[kind](Start(W0, WK, MASK), seed=7, alpha=0.3)
    assert set(result.weights) == set(result.mask) == set(MASK)
    for name, w in result.weights.items():
        assert w.dtype == np.float32
        assert np.all(w[~result.mask[name]] == 0)
        assert np.all(np.isfinite(w))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        perturb.permute(WK, {"fc.weight": np.ones((5, 11), bool)})
    with pytest.raises(KeyError, match="nope"):
        perturb.permute(WK, {"nope": np.ones((5, 12), bool)})
    with pytest.raises(ValueError, match="within"):
        perturb.permute(WK, MASK, within="row")


# -- `ckpt ablate` end to end on the shared tiny run ----------------------------------------
K = 5  # rewind step (stored in the tiny run)


@pytest.fixture(scope="module")
def imp_store(tiny_run, tmp_path_factory):
    """The tiny run with one IMP level rewound to step K (the smoke preset, cut to one run)."""
    store = tmp_path_factory.mktemp("ablate") / "tiny.zarr"
    shutil.copytree(tiny_run, store)
    result = CliRunner().invoke(app, [
        "imp", str(store), "--preset", "smoke", "--levels", "1", "--rewind", str(K),
        "--seeds", "0", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    return store


def drawn_rows(spec) -> list[dict]:
    """Every distinct data row with a ``mean`` anywhere in a Vega-Lite spec."""
    found = []
    if isinstance(spec, dict):
        if "mean" in spec:
            return [spec]
        for value in spec.values():
            found += drawn_rows(value)
    elif isinstance(spec, list):
        for value in spec:
            found += drawn_rows(value)
    return [r for i, r in enumerate(found) if r not in found[:i]]


def _prunable(store) -> list[TensorSpec]:
    return [s for s in param_table(store) if s.prunable]


@pytest.fixture(scope="module")
def ablated(imp_store):
    """`imp_store` after `ckpt ablate` of rewinding and of both noise kinds with alpha 0.5."""
    result = CliRunner().invoke(app, [
        "ablate", str(imp_store), "--rewind", str(K), "--kind", "signs_k_mags_k",
        "--kind", "noise", "--kind", "noise_norm_matched", "--alpha", "0.5", "--preset",
        "smoke", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "noise_alpha_0.5" in result.output
    assert "noise_norm_matched_alpha_0.5" in result.output
    return imp_store


def test_ablate_cli_records_ablated_runs(ablated):
    imp_store = ablated
    summary = read_ablation_summary(imp_store)
    assert list(summary.kind.values) == ["noise_alpha_0.5", "noise_norm_matched_alpha_0.5",
                                         "signs_k_mags_k"]
    assert summary.alpha.sel(kind="noise_alpha_0.5") == 0.5
    assert summary.ablation.sel(kind="noise_norm_matched_alpha_0.5") == "noise_norm_matched"
    assert np.isnan(summary.alpha.sel(kind="signs_k_mags_k"))
    # signs and magnitudes at k is rewinding: the very run IMP level 1 trained.
    imp = read_summary(imp_store).sel(rewind_step=K, level=1, seed=0)
    cell = summary.sel(rewind_step=K, level=1, seed=0)
    assert float(cell.test_accuracy.sel(kind="signs_k_mags_k")) == float(imp.test_accuracy)
    np.testing.assert_allclose(cell.remaining.values, float(imp.remaining))

    mask = read_mask(imp_store, K, 1, 0)
    stored_k = load_state_dict(imp_store, K)
    prunable = {s.name for s in _prunable(imp_store)}
    for kind, fn in (("noise", perturb.add_noise),
                     ("noise_norm_matched", perturb.add_noise_norm_matched)):
        group = ablation_group(f"{kind}_alpha_0.5", K, 1, 0)
        start = load_state_dict(imp_store, K, group=group)
        end = load_state_dict(imp_store, 40, group=group)
        expected = fn({n: stored_k[n].numpy() for n in prunable},
                      {n: mask[n] for n in prunable}, alpha=0.5, seed=0)
        for name, value in stored_k.items():
            if name in prunable:  # the recorded start is the pure function's output
                np.testing.assert_array_equal(start[name].numpy(), expected[name])
                assert torch.all(end[name][~torch.from_numpy(mask[name])] == 0)
            else:  # biases and BatchNorm start from step k
                assert torch.equal(start[name], value)


def test_ablate_without_imp_names_the_command(tiny_copy):
    before = sorted(p.name for p in tiny_copy.iterdir())
    result = CliRunner().invoke(app, ["ablate", str(tiny_copy), "--rewind", "5",
                                      "--kind", "permute_layer"])
    assert result.exit_code == 1
    assert "ckpt imp" in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tiny_copy.iterdir()) == before


def test_ablate_refuses_an_unrun_rewind_and_unknown_kind(imp_store):
    result = CliRunner().invoke(app, ["ablate", str(imp_store), "--rewind", "3",
                                      "--kind", "permute_layer"])
    assert result.exit_code == 1 and "rewind step 3" in result.output
    assert f"ckpt imp {imp_store} --rewind 3" in result.output
    result = CliRunner().invoke(app, ["ablate", str(imp_store), "--rewind", str(K),
                                      "--kind", "shuffle"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["ablate", str(imp_store), "--rewind", str(K),
                                      "--kind", "noise", "--level", "4"])
    assert result.exit_code == 1 and "level 4" in result.output


def test_report_section_draws_the_stored_ablations(ablated):
    run = SimpleNamespace(name="tiny", experiments=gather_experiments(ablated))
    figures = sections.ablation_section([run])
    assert set(figures) == {"noise"}  # rewinding alone draws no sign/magnitude panel
    rows = drawn_rows(figures["noise"].to_dict())
    summary = read_ablation_summary(ablated).sel(rewind_step=K, level=1, seed=0)
    acc = {str(k): float(summary.test_accuracy.sel(kind=k)) for k in summary.kind.values}
    line = f"rewind {K}, level 1"
    # one line per noise kind, both starting at rewinding (alpha 0)
    assert {(r["run"], r["alpha"]): r["mean"] for r in rows} == {
        (line, 0.0): acc["signs_k_mags_k"], (line, 0.5): acc["noise_alpha_0.5"],
        (f"{line}, norm-matched", 0.0): acc["signs_k_mags_k"],
        (f"{line}, norm-matched", 0.5): acc["noise_norm_matched_alpha_0.5"]}


def _imp_and_ablation_summaries():
    """Hand-made seed-level summaries: IMP at k in {0, 5}, and permute_layer and noise at 5."""
    from ckpt_tools.analyses.stats import summarize

    seeds = np.array([0, 1])
    imp = xr.Dataset(
        {"test_accuracy": (("rewind_step", "level", "seed"),
                           [[[0.9, 0.92], [0.7, 0.72], [0.5, 0.52]],
                            [[0.9, 0.92], [0.8, 0.82], [0.75, 0.77]]]),
         "remaining": (("rewind_step", "level", "seed"), np.tile([1.0, 0.5, 0.25], (2, 2, 1))
                       .transpose(0, 2, 1))},
        coords={"rewind_step": [0, 5], "level": [0, 1, 2], "seed": seeds},
        attrs={"dense_test_accuracy": 0.91})
    abl = xr.Dataset(
        {"test_accuracy": (("kind", "rewind_step", "level", "seed"), [[[[0.6, 0.62]]],
                                                                     [[[0.7, 0.74]]]]),
         "remaining": (("kind", "rewind_step", "level", "seed"), np.full((2, 1, 1, 2), 0.25))},
        coords={"kind": np.array(["permute_layer", "noise_alpha_1"], dtype=object),
                "rewind_step": [5], "level": [2], "seed": seeds,
                "ablation": ("kind", np.array(["permute_layer", "noise"], dtype=object)),
                "alpha": ("kind", [np.nan, 1.0])})
    return summarize(imp, "seed", n_resamples=200), summarize(abl, "seed", n_resamples=200)


def test_one_ablation_kind_gets_its_panel_with_the_imp_curves_it_falls_between():
    imp, abl = _imp_and_ablation_summaries()
    figures = ablation_charts.figures(abl, None, imp)
    assert set(figures) == {"permutation", "noise"}
    rows = drawn_rows(figures["permutation"].to_dict())
    refs = {(r["reference"], r["level"]): r["mean"] for r in rows if "reference" in r}
    assert refs == pytest.approx({("IMP rewind to 5", 1): 0.81, ("IMP rewind to 5", 2): 0.76,
                                  ("IMP rewind to 0", 1): 0.71, ("IMP rewind to 0", 2): 0.51})
    assert [r["mean"] for r in rows if r.get("kind") == "permute_layer"] == pytest.approx([0.61])
    # without signs_k_mags_k, the noise chart's alpha = 0 is IMP rewound to k, same level
    noise = {r["alpha"]: r["mean"] for r in drawn_rows(figures["noise"].to_dict())}
    assert noise == pytest.approx({0.0: 0.76, 1.0: 0.72})
