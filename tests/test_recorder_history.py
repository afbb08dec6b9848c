"""Recorder.attach, optimizer-state history and batch ids, against copies kept by the loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import ckpt_tools
import ckpt_tools.analyses  # noqa: F401  (the ds.ckpt accessor)
from ckpt_tools.batches import batch_indices
from ckpt_tools.cli.app import app
from ckpt_tools.data import load
from ckpt_tools.train import TrainConfig, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def _batch(gen, n=8):
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _update(model, opt, gen, n=8):
    x, y = _batch(gen, n)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


# -- attach ---------------------------------------------------------------------------
def test_attach_records_every_scheduled_update_with_no_change_to_the_loop(tmp_path):
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    decay = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    copies = {0: copy.deepcopy(model.state_dict())}
    lrs, norms = {}, {}
    rec = ckpt_tools.Recorder(tmp_path / "r.zarr", model, "0:5:1,5:13:3")
    rec.attach(opt)
    for step in range(1, 13):  # the loop as it was, plus copies for the test
        lrs[step] = opt.param_groups[0]["lr"]
        _update(model, opt, gen)
        decay.step()
        copies[step] = copy.deepcopy(model.state_dict())
        norms[step] = [p.grad.norm().item() for p in model.parameters()]
    rec.close()
    _update(model, opt, gen)  # after close the hook is gone: nothing is recorded or raised
    ds = ckpt_tools.open_history(tmp_path / "r.zarr")
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4, 5, 8, 11]
    for step in ds.step.values.tolist():
        got = ckpt_tools.load_state_dict(tmp_path / "r.zarr", step)
        assert all(torch.equal(got[k], copies[step][k]) for k in copies[step]), step
        if step:
            assert float(ds.lr.sel(step=step)) == lrs[step]
            np.testing.assert_allclose(ds.grad_norm.sel(step=step).values, norms[step],
                                       rtol=1e-6)


def test_attach_counts_from_start_step(tmp_path):
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    with ckpt_tools.Recorder(tmp_path / "r.zarr", model, "0:20:5") as rec:
        rec.attach(opt, start_step=8)  # resuming at step 8: the first update makes step 9
        for _ in range(7):
            _update(model, opt, gen)
        final = copy.deepcopy(model.state_dict())
    ds = ckpt_tools.open_history(tmp_path / "r.zarr")
    assert ds.step.values.tolist() == [10, 15]
    got = ckpt_tools.load_state_dict(tmp_path / "r.zarr", 15)
    assert all(torch.equal(got[k], final[k]) for k in final)


# -- optimizer state ------------------------------------------------------------------
def _state_row(opt, model, key):
    parts = []
    for p in model.parameters():
        value = opt.state.get(p, {}).get(key)
        parts.append(torch.full((p.numel(),), float("nan")) if value is None
                     else value.detach().reshape(-1).clone())
    return torch.cat(parts).numpy()


@pytest.mark.parametrize(("make", "keys"), [
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), ["momentum_buffer"]),
    (lambda ps: torch.optim.Adam(ps, lr=1e-2), ["exp_avg", "exp_avg_sq"]),
])
def test_optimizer_state_rows_are_bit_exact(tmp_path, make, keys):
    torch.manual_seed(0)
    model = _Net()
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(1)
    expect = {}
    with ckpt_tools.Recorder(tmp_path / "r.zarr", model, "0:4:1,4:9:4", optimizer=opt,
                             optimizer_state=True) as rec:
        rec.record(0)
        expect[0] = {k: _state_row(opt, model, k) for k in keys}
        for step in range(1, 9):
            _update(model, opt, gen)
            if rec.record(step):
                expect[step] = {k: _state_row(opt, model, k) for k in keys}
    ds = ckpt_tools.open_history(tmp_path / "r.zarr")
    assert sorted(n for n in ds.data_vars if n.startswith("optim_")) == [f"optim_{k}"
                                                                         for k in keys]
    assert ds.ckpt.optimizer_states() == keys
    for step, rows in expect.items():
        for key, row in rows.items():
            stored = ds[f"optim_{key}"].sel(step=step).values
            np.testing.assert_array_equal(stored, row)  # NaN at step 0 compares equal
            assert np.isnan(stored).all() == (step == 0)
    # The accessor gives the state back per tensor, in its shape.
    state = ds.ckpt.optimizer_state(8)
    for name, p in model.named_parameters():
        for key in keys:
            assert torch.equal(state[name][key], opt.state[p][key]), (name, key)
    shaped = ds.ckpt.layer("conv.weight", state=keys[0])
    assert shaped.dims == ("step", "out", "in", "k0", "k1")
    np.testing.assert_array_equal(shaped.sel(step=8).values,
                                  opt.state[model.conv.weight][keys[0]].numpy())


def test_optimizer_state_needs_an_optimizer_with_per_weight_state(tmp_path):
    model = _Net()
    with pytest.raises(ValueError, match="optimizer_state=True needs the optimizer"):
        ckpt_tools.Recorder(tmp_path / "a.zarr", model, "0:3:1", optimizer_state=True)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: no state
    with pytest.raises(ValueError, match="keeps no per-weight state"):
        ckpt_tools.Recorder(tmp_path / "b.zarr", model, "0:3:1", optimizer=plain,
                            optimizer_state=True)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


# -- batch ids ------------------------------------------------------------------------
def test_batch_ids_are_stored_per_step(tmp_path):
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(1000, generator=gen)
    used = {}
    with ckpt_tools.Recorder(tmp_path / "r.zarr", model, "0:6:1") as rec:
        rec.record(0)
        for step in range(1, 6):
            n = 8 if step < 5 else 5  # a short last batch
            ids = order[(step - 1) * 8:(step - 1) * 8 + n]
            _update(model, opt, gen, n)
            rec.record(step, batch=ids)
            used[step] = ids.numpy()
    ds = ckpt_tools.open_history(tmp_path / "r.zarr")
    assert ds.batch.dims == ("step", "batch_item") and ds.batch.dtype == np.int64
    assert (ds.batch.sel(step=0).values == -1).all()
    for step, ids in used.items():
        np.testing.assert_array_equal(ds.ckpt.batch(step), ids)
    assert (ds.batch.sel(step=5).values[5:] == -1).all()


def test_a_batch_wider_than_the_first_is_refused(tmp_path):
    model = _Net()
    with ckpt_tools.Recorder(tmp_path / "r.zarr", model, "0:3:1") as rec:
        rec.record(0, batch=[1, 2])
        with pytest.raises(ValueError, match="3 example ids at step 1"):
            rec.record(1, batch=[1, 2, 3])
        assert rec.record(2, batch=[7])
    ds = ckpt_tools.open_history(tmp_path / "r.zarr")
    assert ds.step.values.tolist() == [0, 2]
    np.testing.assert_array_equal(ds.ckpt.batch(2), [7])


# -- the built-in loop ----------------------------------------------------------------
def test_ckpt_record_stores_batch_ids_and_momentum(tmp_path):
    out = tmp_path / "run.zarr"
    args = ["record", "--model", "convnet", "--width", "4", "--steps", "12", "--batch-size",
            "32", "--schedule", "0:13:1", "--eval-schedule", "0:13:12", "--quiet",
            "--optimizer-state", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ds = ckpt_tools.open_history(out)
    config = TrainConfig.from_dict(ds.attrs["ckpt_tools"]["config"])
    data = load("digits")
    assert (ds.batch.sel(step=0).values == -1).all()
    for step in range(1, 13):  # the loop's batches are pure functions of (seed, step)
        expect = batch_indices(data, step, batch_size=32, seed=config.order_seed).numpy()
        np.testing.assert_array_equal(ds.ckpt.batch(step), expect)
    # SGD (no dampening, no Nesterov): p_s = p_{s-1} - lr_s * m_s, so the stored momentum
    # is the step the weights took, divided by the learning rate.
    # In float32 p_s is p_{s-1} - lr_s * m_s rounded: within one spacing of p_s (plus one
    # of lr_s * m_s), so the difference divided by lr_s is within that, divided by lr_s.
    params = ds.params.values
    momentum = ds.optim_momentum_buffer.values
    assert np.isnan(momentum[0]).all()
    for step in range(1, 13):
        lr = lr_at(config, step)
        moved = (params[step - 1].astype(np.float64) - params[step]) / lr
        bound = (np.spacing(np.abs(params[step])) + np.spacing(np.abs(lr * momentum[step]))) / lr
        assert (np.abs(momentum[step] - moved) <= 1.01 * bound).all(), step
        assert np.abs(momentum[step]).max() > 100 * bound.max()  # the check has teeth
