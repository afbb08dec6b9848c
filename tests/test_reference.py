"""Results of today's analyses against those of the implementation they replaced.

`tests/data/make_reference.py` stored the telemetry of deterministic synthetic histories
computed by the numpy pass of commit a626803 (before the read path and the compiled
kernel); the same histories, written again, must give the same results to float32
rounding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ckpt_tools.analyses import telemetry

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_reference", DATA / "make_reference.py")
make_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_reference)


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    return make_reference.history(tmp_path_factory.mktemp("ref"), "walk")


@pytest.mark.parametrize("weights", ["all", "prunable"])
def test_telemetry_matches_the_previous_implementation(walk, weights):
    before = xr.load_dataset(DATA / f"telemetry-walk-{weights}.nc", engine="scipy")
    now = telemetry.compute(walk, weights=weights)
    assert sorted(now.data_vars) == sorted(before.data_vars)
    assert now["layer"].values.tolist() == before["layer"].values.tolist()
    np.testing.assert_array_equal(now["step"].values, before["step"].values)
    np.testing.assert_array_equal(now["trace_param"].values, before["trace_param"].values)
    for name in now.data_vars:
        a, b = now[name].values, before[name].values
        assert a.shape == b.shape, name
        if "sign" in name or name in ("grad_norm", "weight_trace"):
            np.testing.assert_array_equal(a, b, err_msg=name)  # counts and copied values
        else:
            # float32 rounding of every term before, exact float64 terms now
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-12, err_msg=name)
    # the differences are real rounding, not copies of the same computation
    assert not np.array_equal(now["l2_to_init"].values, before["l2_to_init"].values)
