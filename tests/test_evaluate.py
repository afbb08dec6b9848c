"""Post-hoc evaluation against an independent one: raw stored rows, one pass of torch's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_reference import reference_eval

import ckpt_tools
from ckpt_tools.analyses import evaluate
from ckpt_tools.analyses.registry import NotApplicable
from ckpt_tools.recorder import Recorder


def test_matches_an_independent_evaluation_of_each_stored_step(tiny_run):
    steps = [0, 3, 17, 25, 40]  # both storage chunks, first and last step
    got = evaluate.compute(tiny_run, steps=steps)
    np.testing.assert_array_equal(got["step"].values, steps)
    for step in steps:
        loss, accuracy = reference_eval(tiny_run, step)
        assert float(got["test_loss"].sel(step=step)) == pytest.approx(loss, rel=1e-5)
        assert float(got["test_accuracy"].sel(step=step)) == pytest.approx(accuracy, abs=1e-12)
    assert got["test_accuracy"].sel(step=40) > got["test_accuracy"].sel(step=0) + 0.3


def test_default_is_every_step_and_agrees_with_training_time_evaluation(tiny_run):
    got = evaluate.compute(tiny_run)
    history = ckpt_tools.open_history(tiny_run)
    np.testing.assert_array_equal(got["step"].values, history["step"].values)
    recorded = history[["test_loss", "test_accuracy"]].rename(eval_step="step")
    for name in ("test_loss", "test_accuracy"):
        np.testing.assert_allclose(got[name].sel(step=recorded["step"]).values,
                                   recorded[name].values, rtol=1e-6)


def test_bad_steps_and_custom_runs(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="not stored in this history: 21, 999"):
        evaluate.compute(tiny_run, steps=[20, 21, 999])
    with pytest.raises(ValueError, match="no steps"):
        evaluate.compute(tiny_run, steps=[])
    model = torch.nn.Linear(3, 2)
    with Recorder(tmp_path / "custom.zarr", model, [0, 1]) as rec:
        rec.record(0)
        rec.record(1)
    with pytest.raises(NotApplicable, match="custom loop"):
        evaluate.compute(tmp_path / "custom.zarr")
