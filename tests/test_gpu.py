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
