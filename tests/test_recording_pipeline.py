"""The recording pipeline: memory budget, streaming, tensor selection, writer failures."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from test_recorder import _Net, _run
from torch import nn

import ckpt_tools
from ckpt_tools.recording import budget
from ckpt_tools.store import read_group_meta
from ckpt_tools.store.integrity import row_digests

MiB = 1 << 20


def _hashes_match(path, group="train"):
    """Every committed row's stored content hash is the hash of its stored values."""
    import zarr

    node = zarr.open_group(str(path / group), mode="r")
    committed = np.flatnonzero(node["committed"][:])
    stored = node["row_hash"][:][committed]
    want = row_digests(node["params"][:][committed], node["buffers"][:][committed])
    np.testing.assert_array_equal(stored, want)
    assert stored.any(axis=1).all()


def test_sizes_parse_in_binary_units():
    assert budget.parse_bytes("2GiB") == 2 << 30
    assert budget.parse_bytes("512 MiB") == 512 << 20
    assert budget.parse_bytes("1.5g") == 3 << 29
    assert budget.parse_bytes(4096) == 4096
    for bad in ("lots", "2 GB", "-1", 0, "1e9"):
        with pytest.raises(ValueError, match="memory size"):
            budget.parse_bytes(bad)


def test_the_plan_takes_the_most_steps_that_fit_then_streams():
    widths = {"params": 3 * 2**18 + 5, "buffers": 10, "grad_norm": 7}
    units = {"params": 2**18, "buffers": 2**18}
    row = sum(widths.values()) * 4
    base = budget.WRITER_BASE
    copies = budget.WRITER_COPIES * 2**18 * 4  # per step, one writer

    def need(rows):
        return budget.SLOTS * rows * row + base + rows * copies

    assert budget.plan(widths, units, budget=need(16), writers=1).rows == 16
    assert budget.plan(widths, units, budget=need(16) - 1, writers=1).rows == 15
    assert budget.plan(widths, units, budget=need(5), writers=1).rows == 5
    # On a store with 16-step chunks, blocks take a divisor of 16.
    assert budget.plan(widths, units, budget=need(7), writers=1, chunk=16).rows == 4
    streamed = budget.plan(widths, units, budget=need(1) - 1, writers=1)
    assert streamed.rows == 1 and len(streamed.segments) > 1
    assert streamed.need <= need(1) - 1
    pieces = [p for seg in streamed.segments for p in seg]
    assert [(p.array, p.start, p.stop) for p in pieces] == [
        ("params", 0, 2**18), ("params", 2**18, 2**19), ("params", 2**19, 3 * 2**18),
        ("params", 3 * 2**18, 3 * 2**18 + 5), ("buffers", 0, 10), ("grad_norm", 0, 7)]
    with pytest.raises(ValueError, match=r"smallest budget that works is ([0-9.]+) MiB") as e:
        budget.plan(widths, units, budget=base, writers=1)
    smallest = float(e.value.args[0].rsplit(" ", 2)[1]) * MiB
    assert budget.plan(widths, units, budget=int(smallest), writers=1).rows == 1


def test_chunk_steps_follow_the_budget_and_rows_stay_exact(tmp_path):
    path = tmp_path / "r.zarr"
    copies = {}
    small = budget.WRITER_BASE + 64 * 1024  # a few rows of _Net (~1,500 values each)
    _run(path, "0:21:1", n=20, copies=copies, host_memory=small, writers=1)
    meta = read_group_meta(path, "train")
    assert 1 < meta["chunk_steps"] < 16
    _hashes_match(path)
    for step in (0, 7, 20):
        got = ckpt_tools.load_state_dict(path, step)
        for name, tensor in got.items():
            assert torch.equal(tensor, copies[step][name]), (step, name)


class _Wide(nn.Module):
    """615,000 weights: three storage chunks along `param`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1024, 600)
        self.bn = nn.BatchNorm1d(600)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_a_row_larger_than_the_budget_is_streamed_exactly(tmp_path):
    torch.manual_seed(0)
    model = _Wide()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    piece = 2**18 * 4
    host = 2 * (budget.WRITER_BASE + budget.WRITER_COPIES * piece) + budget.SLOTS * piece
    copies = {}
    with ckpt_tools.Recorder(tmp_path / "w.zarr", model, "0:6:1", host_memory=host,
                             writers=2) as rec:
        assert rec.plan.rows == 1 and len(rec.plan.segments) >= 3
        for step in range(6):
            if step:
                loss = model(torch.randn(8, 1024)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            rec.record(step, loss=float(step))
            copies[step] = {k: v.clone() for k, v in model.state_dict().items()}
    ds = ckpt_tools.open_history(tmp_path / "w.zarr")
    assert ds.loss.values[1:].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    _hashes_match(tmp_path / "w.zarr")
    for step, state in copies.items():
        got = ckpt_tools.load_state_dict(tmp_path / "w.zarr", step)
        assert all(torch.equal(got[k], v) for k, v in state.items()), step


def test_a_budget_too_small_for_one_row_is_refused_before_any_write(tmp_path):
    with pytest.raises(ValueError, match=r"^host_memory=1.0 MiB cannot hold one recorded row "
                       r"of _Wide .*smallest budget that works is [0-9.]+ MiB$"):
        ckpt_tools.Recorder(tmp_path / "x.zarr", _Wide(), "0:3:1", host_memory="1MiB",
                            writers=1)
    assert not (tmp_path / "x.zarr").exists()


def test_include_and_exclude_record_only_the_matching_tensors(tmp_path):
    copies = {}
    _run(tmp_path / "w.zarr", "0:6:1", n=5, copies=copies, include="*.weight",
         exclude=["bn.*"])
    ds = ckpt_tools.open_history(tmp_path / "w.zarr")
    assert [str(n) for n in ds.layer.values] == ["conv.weight", "head.weight"]
    assert ds.sizes["param"] == 4 * 9 + 10 * 144 and ds.sizes["buffer"] == 0
    got = ckpt_tools.load_state_dict(tmp_path / "w.zarr", 5)
    assert set(got) == {"conv.weight", "head.weight"}
    for name, tensor in got.items():
        assert torch.equal(tensor, copies[5][name])
    with pytest.raises(ValueError, match="no tensor of _Net matches"):
        ckpt_tools.Recorder(tmp_path / "n.zarr", _Net(), "0:3:1", include="*attn*")


def _train_steps(rec, model, opt, steps, copies):
    for step in steps:
        loss = model(torch.randn(8, 1, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.record(step, loss=loss.item())
        copies[step] = {k: v.clone() for k, v in model.state_dict().items()}


def _committed_exactly(path, copies, steps):
    ds = ckpt_tools.open_history(path)
    assert ds.step.values.tolist() == list(steps)
    for step in steps:
        got = ckpt_tools.load_state_dict(path, step)
        assert all(torch.equal(got[k], copies[step][k]) for k in got), step


def test_a_killed_writer_process_is_reported_and_committed_rows_stay(tmp_path):
    torch.manual_seed(0)
    model, copies = _Net(), {}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = ckpt_tools.Recorder(tmp_path / "k.zarr", model, "0:100:1", writers=2)
    _train_steps(rec, model, opt, range(0, 5), copies)
    rec.flush()
    os.kill(rec._pipe.pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    with pytest.raises(RuntimeError) as err:
        while time.monotonic() < deadline:
            _train_steps(rec, model, opt, [rec.schedule.steps[rec._last + 1]], copies)
            time.sleep(0.01)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"writing to {tmp_path / 'k.zarr'} failed: writer process ")
    assert "was killed by SIGKILL" in message
    with pytest.raises(RuntimeError, match="killed by SIGKILL"):
        rec.close()
    _committed_exactly(tmp_path / "k.zarr", copies, range(5))


def test_a_full_disk_is_one_line_and_keeps_the_committed_rows(tiny_disk):
    torch.manual_seed(0)
    model, copies = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4)), {}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def steps(rec, range_):
        for step in range_:
            loss = model(torch.randn(8, 256)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(step)
            copies[step] = {k: v.clone() for k, v in model.state_dict().items()}

    path = tiny_disk / "f.zarr"
    rec = ckpt_tools.Recorder(path, model, "1:200:1", writers=1)
    steps(rec, range(1, 4))
    rec.flush()  # ~0.8 MiB on an 8 MiB disk
    with pytest.raises(RuntimeError) as err:
        steps(rec, range(4, 200))
        rec.flush()
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message, message
    with pytest.raises(RuntimeError, match="No space left on device"):
        rec.close()
    # Every shown row is exact; the rows flushed before the disk filled are all there.
    shown = ckpt_tools.open_history(path).step.values.tolist()
    assert shown[:3] == [1, 2, 3] and len(shown) < 199
    _committed_exactly(path, copies, shown)
