"""Shared fixtures: one tiny recorded run, reused read-only by every test that needs one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ckpt_tools.train import TrainConfig, train

TINY = TrainConfig(
    model="convnet",
    dataset="digits",
    width=8,
    steps=40,
    batch_size=64,
    schedule="0:20:1,20:41:5",
    eval_schedule="0:41:20",
    seed=0,
)
"""The shared tiny run: a small conv net on the embedded digits, 40 updates, 26 checkpoints."""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A recorded store of `TINY` (treat it as read-only; copy it with `tiny_copy`)."""
    out = tmp_path_factory.mktemp("runs") / "tiny.zarr"
    train(TINY, out)
    return out


@pytest.fixture
def tiny_copy(tiny_run, tmp_path) -> Path:
    """A private, writable copy of the tiny recorded store."""
    dst = tmp_path / "tiny.zarr"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (``pytest.mark.usefixtures("one_thread")``).

    Tiny models and tensors run several times faster on one thread when the two cores
    are shared: waking a second thread costs more than the work.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
