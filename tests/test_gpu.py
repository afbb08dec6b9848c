"""Recording from a CUDA device (runs only where one is present)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY

import ckpt_tools
from ckpt_tools.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_rows_recorded_on_cuda_are_bit_exact(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.Linear(32, 4)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    copies = {}
    with ckpt_tools.Recorder(tmp_path / "g.zarr", model, "0:20:1") as rec:
        rec.record(0)
        copies[0] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for step in range(1, 20):
            loss = model(torch.randn(8, 16, device="cuda")).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(step, loss=loss.item())
            copies[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for step, state in copies.items():
        got = ckpt_tools.load_state_dict(tmp_path / "g.zarr", step)
        for name, tensor in state.items():
            assert torch.equal(got[name], tensor), (step, name)


def test_built_in_training_on_cuda(tmp_path):
    cfg = dataclasses.replace(TINY, device="cuda", steps=10, schedule="0:11:1")
    result = train(cfg, tmp_path / "c.zarr")
    assert result.last_step == 10
    assert ckpt_tools.open_history(tmp_path / "c.zarr").sizes["step"] == 11


def _bn_net():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                               torch.nn.Linear(32, 4))


def test_record_never_synchronises_the_training_stream(tmp_path):
    model = _bn_net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ckpt_tools.Recorder(tmp_path / "s.zarr", model, "0:6:1", optimizer=opt,
                             writers=1) as rec:
        assert rec._pinned  # the shared region is page-locked: copies can be asynchronous
        rec.record(0)
        for step in range(1, 6):
            loss = model(torch.randn(8, 16, device="cuda")).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued before `record`
            torch.cuda.set_sync_debug_mode("error")
            try:
                rec.record(step, lr=0.1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            # Had `record` waited for the device, the sleep would be over by now.
            assert not torch.cuda.current_stream().query()
    assert ckpt_tools.open_history(tmp_path / "s.zarr").sizes["step"] == 6


def test_cuda_and_cpu_record_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    gpu = _bn_net().cuda()
    cpu = _bn_net()
    opt = torch.optim.SGD(gpu.parameters(), lr=0.1, momentum=0.9)
    with ckpt_tools.Recorder(tmp_path / "g.zarr", gpu, "0:40:1", optimizer=opt) as rg, \
            ckpt_tools.Recorder(tmp_path / "c.zarr", cpu, "0:40:1") as rc:
        for step in range(40):
            if step:
                loss = gpu(torch.randn(8, 16, device="cuda")).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                torch.cuda._sleep(10_000_000)  # widen any race between copy and update
            rg.record(step)
            cpu.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
            rc.record(step)
    g = ckpt_tools.open_history(tmp_path / "g.zarr")
    c = ckpt_tools.open_history(tmp_path / "c.zarr")
    for name in ("params", "buffers"):
        assert g[name].values.tobytes() == c[name].values.tobytes(), name
    # Gradient norms come from the device: finite wherever a gradient existed.
    assert bool(torch.isfinite(torch.from_numpy(g.grad_norm.values[1:])).all())


def test_a_row_streamed_in_segments_from_cuda_is_exact(tmp_path):
    from ckpt_tools.recording import budget

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 600), torch.nn.BatchNorm1d(600)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    piece = 2**18 * 4
    host = budget.WRITER_BASE + budget.WRITER_COPIES * piece + budget.SLOTS * piece
    copies = {}
    with ckpt_tools.Recorder(tmp_path / "w.zarr", model, "0:5:1", host_memory=host,
                             writers=1, optimizer=opt) as rec:
        assert rec.plan.rows == 1 and len(rec.plan.segments) >= 3
        for step in range(5):
            if step:
                loss = model(torch.randn(8, 1024, device="cuda")).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            rec.record(step)
            copies[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for step, state in copies.items():
        got = ckpt_tools.load_state_dict(tmp_path / "w.zarr", step)
        assert all(torch.equal(got[k], v) for k, v in state.items()), step
