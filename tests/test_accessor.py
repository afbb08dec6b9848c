"""The ``ds.ckpt`` accessor against the stored rows and `load_state_dict`."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

import ckpt_tools
import ckpt_tools.analyses  # noqa: F401  (registers ds.ckpt)
from ckpt_tools.analyses import telemetry
from ckpt_tools.store import StoreError


@pytest.fixture
def history(tiny_run):
    return ckpt_tools.open_history(tiny_run)


def test_layer_is_the_lazy_tensor_over_steps(history, tiny_run):
    w = history.ckpt.layer("features.3.weight")
    assert isinstance(w.data, da.Array)
    assert w.dims == ("step", "out", "in", "k0", "k1") and w.shape[1:] == (16, 8, 3, 3)
    np.testing.assert_array_equal(w["step"], history["step"])
    for step in (0, 19, 40):
        expected = ckpt_tools.load_state_dict(tiny_run, step)["features.3.weight"].numpy()
        np.testing.assert_array_equal(w.sel(step=step).values, expected)
    bias = history.ckpt.layer("fc.bias")
    assert bias.dims == ("step", "out")
    running = history.ckpt.layer("features.1.running_var")  # buffers too
    np.testing.assert_array_equal(
        running.sel(step=40).values,
        ckpt_tools.load_state_dict(tiny_run, 40)["features.1.running_var"].numpy())
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        history.ckpt.layer("nope")


def test_state_dict_equals_load_state_dict(history, tiny_run):
    got = history.ckpt.state_dict(25)
    ref = ckpt_tools.load_state_dict(tiny_run, 25)
    assert list(got) == list(ref)
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    with pytest.raises(StoreError, match="step 21 is not in this history; nearest: 18, 19, 20"):
        history.ckpt.state_dict(21)


def test_telemetry_and_tensor_list(history):
    xr.testing.assert_identical(history.ckpt.telemetry(n_traces=3),
                                telemetry.compute(history, n_traces=3))
    names = history.ckpt.tensors()
    assert names[0] == "features.0.weight" and "features.1.num_batches_tracked" in names
