"""Recorder: bit-exact rows at exactly the scheduled steps, from a loop written here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ckpt_tools
from ckpt_tools.store import StoreError


class _Net(nn.Module):
    """A model no built-in code knows: conv, BN (int64 counter buffer), linear, bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def _run(path, schedule, *, n=30, copies=None, **kwargs):
    """A plain Adam loop that records and keeps its own copies of the state."""
    torch.manual_seed(1)
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    with ckpt_tools.Recorder(path, model, schedule, config={"seed": 1}, **kwargs) as rec:
        assert rec.record(0)
        if copies is not None:
            copies[0] = {k: v.clone() for k, v in model.state_dict().items()}
        for step in range(1, n + 1):
            x = torch.randn(8, 1, 8, 8, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            grads = {k: p.grad.norm().item() for k, p in model.named_parameters()}
            recorded = rec.record(step, loss=loss.item())
            assert recorded == (step in rec.schedule)
            if recorded and copies is not None:
                copies[step] = {k: v.clone() for k, v in model.state_dict().items()}
                copies[step]["__grads"] = grads
                copies[step]["__loss"] = loss.item()
    return model


def test_rows_are_bit_exact_at_exactly_the_scheduled_steps(tmp_path):
    copies = {}
    sched = ckpt_tools.Schedule.parse("0:10:1,10:31:4")
    _run(tmp_path / "r.zarr", sched, copies=copies)
    ds = ckpt_tools.open_history(tmp_path / "r.zarr")
    assert ds.step.values.tolist() == sorted(copies) == list(sched.steps)
    for step, state in copies.items():
        got = ckpt_tools.load_state_dict(tmp_path / "r.zarr", step)
        for name, tensor in got.items():
            assert tensor.dtype == state[name].dtype, name
            assert torch.equal(tensor, state[name]), (step, name)
        assert set(got) == {k for k in state if not k.startswith("__")}
        if step:
            row = ds.sel(step=step)
            assert float(row.loss) == state["__loss"]
            names = [str(n) for n in ds.layer.values]
            expect = np.array([state["__grads"][n] for n in names], dtype=np.float32)
            np.testing.assert_allclose(row.grad_norm.values, expect, rtol=1e-6)


def test_loaded_state_reproduces_outputs(tmp_path):
    model = _run(tmp_path / "r.zarr", "0:31:5")
    fresh = _Net()
    fresh.load_state_dict(ckpt_tools.load_state_dict(tmp_path / "r.zarr", 30))
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_off_schedule_and_out_of_order(tmp_path):
    model = _Net()
    with ckpt_tools.Recorder(tmp_path / "r.zarr", model, "0:10:2") as rec:
        assert not rec.record(1)
        assert rec.record(2)
        with pytest.raises(ValueError, match="out of order"):
            rec.record(0)


def test_existing_group_is_refused_then_overwritten_keeping_others(tmp_path):
    path = tmp_path / "r.zarr"
    _run(path, "0:5:1", n=4)
    _run(path, "0:5:1", n=4, group="other")
    before = ckpt_tools.open_history(path, "other").params.values.copy()
    with pytest.raises(StoreError, match="already exists.*--overwrite"):
        ckpt_tools.Recorder(path, _Net(), "0:5:1")
    _run(path, "0:3:1", n=2, overwrite=True)
    assert ckpt_tools.open_history(path).sizes["step"] == 3
    np.testing.assert_array_equal(ckpt_tools.open_history(path, "other").params.values, before)


def test_uncommitted_rows_are_invisible(tmp_path):
    path = tmp_path / "r.zarr"
    _run(path, "0:5:1", n=4)
    # A row written but never committed (a crash between the two) must not show.
    from ckpt_tools.store import HistoryWriter

    writer = HistoryWriter.reopen(path, "train")
    writer.write_rows(2, np.full((1, writer.n_params), 7.0, np.float32),
                      np.zeros((1, 0), np.float32))
    mask = writer.committed_mask()
    mask[2] = False
    writer._committed[:] = mask
    ds = ckpt_tools.open_history(path)
    assert ds.step.values.tolist() == [0, 1, 3, 4]
    with pytest.raises(StoreError, match=r"step 2 is not stored.*nearest stored steps: (0, )?1, 3"):
        ckpt_tools.load_state_dict(path, 2)


def test_ddp_only_rank_zero_writes(tmp_path):
    script = Path(__file__).with_name("ddp_record.py")
    out = tmp_path / "ddp.zarr"
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = dict(re.findall(r"(rank\d)=(True|False)", done.stdout))
    assert ranks == {"rank0": "True", "rank1": "False"}
    ds = ckpt_tools.open_history(out)
    assert ds.step.values.tolist() == list(range(0, 11, 2))
    # DDP keeps replicas identical: the stored final weights are rank 0's = rank 1's.
    final = ckpt_tools.load_state_dict(out, 10)
    reference = torch.load(tmp_path / "rank1_final.pt", weights_only=True)
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), name
