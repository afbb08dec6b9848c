import shutil

import numpy as np
import pytest
import torch
from eval_reference import loss_and_accuracy, reference_eval, split_logits, stored_state
from torch import nn
from typer.testing import CliRunner

from ckpt_tools import load_state_dict, open_history
from ckpt_tools.analyses.experiments.instability import (
    PREFIX,
    InstabilitySettings,
    copy_group,
    error_barrier,
    interpolate,
    path_metrics,
    read_instability,
    recompute_bn,
    run_instability,
)
from ckpt_tools.analyses.experiments.presets import PRESETS
from ckpt_tools.analyses.experiments.pruning import dense_config
from ckpt_tools.cli.app import app

SMOKE = PRESETS["smoke"].instability


pytestmark = pytest.mark.usefixtures("one_thread")


def test_interpolate_is_linear_and_keeps_counters():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, -2.0]), "n": torch.tensor(9)}
    for alpha, want in ((0.0, [0.0, 2.0]), (0.25, [1.0, 1.0]), (1.0, [4.0, -2.0])):
        out = interpolate(a, b, alpha)
        assert out["w"].tolist() == want and int(out["n"]) == 3


def test_error_barrier_is_max_minus_mean_of_ends():
    assert error_barrier(np.array([0.1, 0.5, 0.3])) == pytest.approx(0.5 - 0.2)
    assert error_barrier(np.array([0.2, 0.1, 0.2])) == pytest.approx(0.0)
    np.testing.assert_allclose(error_barrier(np.array([[0.0, 1.0, 0.0], [0.4, 0.2, 0.0]])),
                               [1.0, 0.2])


def test_recompute_bn_averages_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    xs = [torch.randn(5, 2, 6, 6) * (i + 1) for i in range(3)]
    recompute_bn(model, xs)
    with torch.no_grad():
        feats = [model[0](x) for x in xs]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    vars_ = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means)
    torch.testing.assert_close(model[1].running_var, vars_)
    assert model[1].momentum == 0.1  # restored


def test_path_between_identical_states_is_flat(tiny_run):
    config = dense_config(tiny_run)
    state = load_state_dict(tiny_run, config.steps)
    m = path_metrics(config, state, state, [0.0, 0.5, 1.0], bn="interpolate")
    assert np.ptp(m["test_error"]) == 0 and error_barrier(m["test_error"]) == 0
    loss, acc = reference_eval(tiny_run, config.steps)  # the stored network, evaluated apart
    assert m["test_error"][0] == pytest.approx(1 - acc, abs=1e-12)
    assert m["test_loss"][0] == pytest.approx(loss, rel=1e-5)


def test_barrier_of_a_path_whose_errors_are_known(tiny_run):
    # b is a with its output layer negated. Along the line the logits are (1 - 2 alpha)
    # times a's: a's predictions before the middle, all logits 0 at it (every example
    # taken for class 0, loss ln 10), a's least likely class after it.
    config = dense_config(tiny_run)
    a = stored_state(tiny_run, config.steps)
    b = {**a, "fc.weight": -a["fc.weight"], "fc.bias": -a["fc.bias"]}
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    m = path_metrics(config, a, b, alphas, bn="interpolate")
    logits, labels = split_logits(tiny_run, config.steps)
    want = np.array([loss_and_accuracy((1 - 2 * alpha) * logits, labels) for alpha in alphas])
    error = 1 - want[:, 1]
    assert error[2] == pytest.approx(float((labels != 0).double().mean()), abs=1e-12)
    assert want[2, 0] == pytest.approx(np.log(10), rel=1e-12)
    assert error[3] == error[4] == pytest.approx(
        float((logits.argmin(1) != labels).double().mean()), abs=1e-12)
    np.testing.assert_allclose(m["test_error"], error, atol=1e-12)
    np.testing.assert_allclose(m["test_loss"], want[:, 0], rtol=1e-5)
    barrier = error.max() - (error[0] + error[-1]) / 2
    assert barrier > 0.2  # a trained net's least likely class is nearly always wrong
    assert error_barrier(m["test_error"]) == pytest.approx(barrier, abs=1e-12)


@pytest.fixture(scope="module")
def smoke(tiny_run, tmp_path_factory):
    store = tmp_path_factory.mktemp("instability") / "tiny.zarr"
    shutil.copytree(tiny_run, store)
    result = CliRunner().invoke(app, ["instability", str(store), "--preset", "smoke", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "barrier" in result.output
    return store


def test_cli_result_holds_the_barrier_of_every_rewind_step(smoke):
    result = read_instability(smoke)
    assert list(result.rewind_step.values) == list(SMOKE.rewind_steps)
    assert result.sizes["alpha"] == SMOKE.points and result.sizes["pair"] == 1
    error = result.test_error
    by_hand = error.max("alpha") - (error.isel(alpha=0) + error.isel(alpha=-1)) / 2
    np.testing.assert_allclose(result.barrier.values, by_hand.values, atol=1e-12)
    np.testing.assert_allclose(result.alpha.values, np.linspace(0, 1, SMOKE.points))
    assert (int(result.seed_a[0]), int(result.seed_b[0])) == SMOKE.seeds


def test_copies_start_at_k_and_differ_by_data_order(smoke):
    dense = open_history(smoke)
    config = dense_config(smoke)
    for k in SMOKE.rewind_steps:
        finals = []
        for seed in SMOKE.seeds:
            h = open_history(smoke, copy_group(PREFIX, k, seed))
            assert int(h.step[0]) == k
            np.testing.assert_array_equal(h.params.values[0], dense.params.sel(step=k).values)
            assert h.attrs["ckpt_tools"]["config"]["data_seed"] == seed
            finals.append(h.params.values[-1])
        assert not np.array_equal(*finals)
        # the path's ends, with the stored BatchNorm statistics, are the copies themselves
        a, b = (load_state_dict(smoke, config.steps, group=copy_group(PREFIX, k, s))
                for s in SMOKE.seeds)
        ends = path_metrics(config, a, b, [0.0, 1.0], bn="interpolate")["test_error"]
        for end, seed in zip(ends, SMOKE.seeds, strict=True):
            _, acc = reference_eval(smoke, config.steps, copy_group(PREFIX, k, seed))
            assert end == pytest.approx(1 - acc, abs=1e-12)


def test_new_rewind_steps_merge_into_the_stored_result(smoke):
    settings = InstabilitySettings(rewind_steps=(3,), seeds=SMOKE.seeds, points=SMOKE.points,
                                   bn_batches=SMOKE.bn_batches, schedule=SMOKE.schedule)
    before = read_instability(smoke)
    merged = run_instability(smoke, settings)
    assert list(merged.rewind_step.values) == sorted({*SMOKE.rewind_steps, 3})
    np.testing.assert_array_equal(merged.test_error.sel(rewind_step=list(SMOKE.rewind_steps)),
                                  before.test_error)


def test_rewind_step_not_stored_is_one_line(tiny_copy):
    result = CliRunner().invoke(app, ["instability", str(tiny_copy), "--rewind", "23"])
    assert result.exit_code == 1
    assert "nearest stored steps: 19, 20, 25" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tiny_copy / "experiments" / "instability").exists()


@pytest.mark.parametrize("kwargs", [
    {"rewind_steps": ()}, {"rewind_steps": (0,), "seeds": (1,)},
    {"rewind_steps": (0,), "seeds": (1, 1)}, {"rewind_steps": (0,), "points": 1},
    {"rewind_steps": (0,), "bn": "other"},
])
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError):
        InstabilitySettings(**kwargs)


def test_masked_copies_keep_the_imp_mask(tiny_copy):
    from ckpt_tools.analyses.experiments.pruning import mask_to_row, param_table, prune, write_mask

    specs = param_table(tiny_copy)
    final = load_state_dict(tiny_copy, dense_config(tiny_copy).steps)
    mask = prune({s.name: final[s.name] for s in specs if s.prunable}, 0.5)
    write_mask(tiny_copy, 5, 1, 0, mask, settings={"fraction": 0.5})
    settings = InstabilitySettings(rewind_steps=(5,), points=3, bn_batches=1, level=1,
                                   schedule=SMOKE.schedule)
    result = run_instability(tiny_copy, settings)
    assert result.attrs["level"] == 1
    row = mask_to_row(mask, specs)
    for seed in settings.seeds:
        params = open_history(tiny_copy, copy_group(f"{PREFIX}/level_1", 5, seed)).params
        assert np.all(params.values[:, ~row] == 0.0)
    xr_result = read_instability(tiny_copy, level=1)
    np.testing.assert_array_equal(xr_result.barrier.values, result.barrier.values)


def test_report_draws_the_barrier_against_k(smoke):
    from ckpt_tools.analyses.report import build_report, load_runs

    report = build_report(load_runs([smoke]))
    figures = dict(next(f for s, f in report.sections if s.title.startswith("Instability")))
    assert {"instability", "interpolation"} <= set(figures)
    spec = figures["instability"].to_dict()
    rows = [r for values in spec["datasets"].values() for r in values]
    result = read_instability(smoke)
    got = {r["rewind_step"]: r["mean"] for r in rows}
    want = dict(zip(result.rewind_step.values.tolist(), result.barrier.mean("pair").values,
                    strict=True))
    assert got.keys() == want.keys()
    for k, value in want.items():
        assert got[k] == pytest.approx(value)
