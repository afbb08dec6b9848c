"""The built-in training loop: determinism, the lr schedule, evaluation, rewinding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY
from eval_reference import reference_eval

import ckpt_tools
from ckpt_tools.train import TrainConfig, build, lr_at, train


def test_same_seed_gives_bitwise_identical_stores(tiny_run, tmp_path):
    train(TINY, tmp_path / "again.zarr")
    a = ckpt_tools.open_history(tiny_run)
    b = ckpt_tools.open_history(tmp_path / "again.zarr")
    assert a.params.values.tobytes() == b.params.values.tobytes()
    assert a.buffers.values.tobytes() == b.buffers.values.tobytes()
    np.testing.assert_array_equal(a.loss.values, b.loss.values)


def test_other_seed_differs(tiny_run, tmp_path):
    cfg = dataclasses.replace(TINY, seed=1, steps=2, schedule="0:3:1")
    train(cfg, tmp_path / "s1.zarr")
    a = ckpt_tools.open_history(tiny_run).params.isel(step=0).values
    b = ckpt_tools.open_history(tmp_path / "s1.zarr").params.isel(step=0).values
    assert not np.array_equal(a, b)


def test_lr_schedule_steps_down_at_milestones():
    cfg = TrainConfig(steps=100, lr=0.1, lr_milestones=(0.5, 0.75), lr_gamma=0.1)
    assert lr_at(cfg, 1) == pytest.approx(0.1)
    assert lr_at(cfg, 50) == pytest.approx(0.1)
    assert lr_at(cfg, 51) == pytest.approx(0.01)
    assert lr_at(cfg, 76) == pytest.approx(0.001)
    warm = dataclasses.replace(cfg, warmup_steps=10)
    assert lr_at(warm, 5) == pytest.approx(0.05)


def test_recorded_scalars_and_evaluation(tiny_run):
    ds = ckpt_tools.open_history(tiny_run)
    expected = [lr_at(TINY, int(s)) for s in ds.step.values[1:]]
    np.testing.assert_allclose(ds.lr.values[1:], expected)
    assert np.isnan(ds.loss.values[0]) and np.isfinite(ds.loss.values[1:]).all()
    assert ds.eval_step.values.tolist() == [0, 20, 40]
    for step in (0, 20, 40):  # training-time evaluation against an independent one
        loss, accuracy = reference_eval(tiny_run, step)
        assert float(ds.test_accuracy.sel(eval_step=step)) == pytest.approx(accuracy, abs=1e-12)
        assert float(ds.test_loss.sel(eval_step=step)) == pytest.approx(loss, rel=1e-5)


def test_continuing_from_a_stored_step_reproduces_the_run(tiny_run, tmp_path):
    # Rewinding starts from the stored row bit for bit and continues with the lr (and the
    # data order) of the uninterrupted run; only the optimizer state starts afresh.
    start = ckpt_tools.load_state_dict(tiny_run, 20)
    train(TINY, tmp_path / "k.zarr", init=start, start_step=20)
    ds = ckpt_tools.open_history(tmp_path / "k.zarr")
    assert ds.step.values[0] == 20
    first = ds.params.isel(step=0).values
    assert first.tobytes() == ckpt_tools.open_history(tiny_run).params.sel(step=20).values.tobytes()
    np.testing.assert_allclose(ds.lr.values[1:], [lr_at(TINY, int(s)) for s in ds.step.values[1:]])


def test_masked_weights_stay_exactly_zero(tmp_path):
    cfg = dataclasses.replace(TINY, steps=10, schedule="0:11:1")
    model, _ = build(cfg)
    rng = np.random.default_rng(0)
    mask = {"fc.weight": rng.random(tuple(model.fc.weight.shape)) < 0.5}
    train(cfg, tmp_path / "m.zarr", mask=mask)
    for step in range(11):
        state = ckpt_tools.load_state_dict(tmp_path / "m.zarr", step)
        assert torch.all(state["fc.weight"][torch.from_numpy(~mask["fc.weight"])] == 0)


@pytest.mark.parametrize(
    ("field", "value"), [("steps", 0), ("batch_size", 0), ("lr", -1.0), ("lr", float("nan"))]
)
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=field.replace("_", " ") if field != "lr" else "rate"):
        TrainConfig(**{field: value})
