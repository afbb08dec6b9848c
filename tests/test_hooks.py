"""The training loop calls its hooks at fixed points; a mask is a hook."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY

import ckpt_tools
from ckpt_tools.hooks import Hook, Mask
from ckpt_tools.train import train

SHORT = dataclasses.replace(TINY, steps=6, schedule="0:7:2", eval_schedule="0:7:3")


class Log(Hook):
    """Writes down every call, with what the loop's state says at that point."""

    def __init__(self):
        self.calls = []

    def on_start(self, state):
        self.calls.append(("start", state.step, state.resumed))

    def before_update(self, state, step):
        grads = [p.grad for p in state.model.parameters()]
        self.calls.append(("before", step, all(g is not None for g in grads)))

    def after_update(self, state, step, loss):
        self.calls.append(("after", step, np.isfinite(loss)))

    def on_evaluation(self, state, step, metrics):
        self.calls.append(("eval", step, sorted(metrics)))

    def on_resume_point(self, state, point):
        self.calls.append(("resume point", point.step, state.step))

    def on_end(self, state, completed):
        self.calls.append(("end", state.step, completed))


@pytest.mark.usefixtures("one_thread")
def test_hooks_are_called_at_each_fixed_point_in_order(tmp_path):
    log = Log()
    train(SHORT, tmp_path / "run.zarr", hooks=[log], resume_interval=0)
    metrics = ["test_accuracy", "test_loss"]
    expected = [("start", 0, False), ("eval", 0, metrics)]
    for step in range(1, 7):
        expected += [("before", step, True), ("after", step, True)]
        if step % 3 == 0:
            expected.append(("eval", step, metrics))
        if step < 6:
            expected.append(("resume point", step, step))
    expected.append(("end", 6, True))
    assert log.calls == expected


@pytest.mark.usefixtures("one_thread")
def test_a_mask_hook_is_the_mask_argument(tmp_path):
    model_names = [n for n, _ in ckpt_tools.train.build(SHORT)[0].named_parameters()]
    rng = np.random.default_rng(0)
    shapes = {n: p.shape for n, p in ckpt_tools.train.build(SHORT)[0].named_parameters()}
    mask = {n: (rng.random(shapes[n]) > 0.5).astype(np.float32)
            for n in model_names if n.endswith("weight")}
    train(SHORT, tmp_path / "a.zarr", mask=mask)
    train(SHORT, tmp_path / "b.zarr", hooks=[Mask(mask)])
    a = ckpt_tools.open_history(tmp_path / "a.zarr")
    b = ckpt_tools.open_history(tmp_path / "b.zarr")
    assert a.params.values.tobytes() == b.params.values.tobytes()
    final = ckpt_tools.load_state_dict(tmp_path / "a.zarr", 6)
    for name, m in mask.items():  # pruned weights stayed exactly zero through training
        assert torch.all(final[name][torch.as_tensor(m) == 0] == 0)
        assert torch.any(final[name][torch.as_tensor(m) == 1] != 0)
