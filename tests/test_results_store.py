"""Results in the store: written whole or not at all, readable by xarray and ckpt-tools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import xarray as xr

import ckpt_tools
from ckpt_tools.store import (
    StoreError,
    history_groups,
    list_results,
    read_result,
    result_path,
    write_result,
)


def result(value: float, n: int = 5) -> xr.Dataset:
    return xr.Dataset(
        {"x": ("step", np.full(n, value)), "y": (("step", "layer"), np.ones((n, 2)))},
        coords={"step": np.arange(n), "layer": ["a.weight", "b.weight"]},
        attrs={"ckpt_tools": {"options": {"k": 1}}, "note": "kept"},
    )


def test_round_trip_and_layout(tiny_copy):
    assert write_result(tiny_copy, "demo", result(1.0)) == "analyses/demo"
    got = read_result(tiny_copy, "demo")
    xr.testing.assert_equal(got, result(1.0))
    meta = got.attrs["ckpt_tools"]
    assert meta["kind"] == "analysis" and meta["analysis"] == "demo"
    assert meta["group"] == "train" and meta["options"] == {"k": 1}
    assert got.attrs["note"] == "kept" and meta["version"] and meta["created"]
    assert list_results(tiny_copy)[0]["path"] == "analyses/demo"
    assert result_path("demo", "imp/level_1") == "analyses/imp/level_1/demo"
    assert history_groups(tiny_copy) == ["train"]  # a result is not a history


def test_store_still_opens_cleanly(tiny_copy):
    write_result(tiny_copy, "demo", result(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(os.fspath(tiny_copy), engine="zarr")
    assert tree["analyses/demo"]["x"].values.tolist() == [1.0] * 5
    ours = ckpt_tools.open_store(tiny_copy)
    assert "demo" in ours["analyses"].children
    assert ours["train"].sizes["step"] == 25


def test_rewrite_replaces_whole(tiny_copy):
    write_result(tiny_copy, "demo", result(1.0, n=5))
    write_result(tiny_copy, "demo", result(2.0, n=3).drop_vars("y"))
    got = read_result(tiny_copy, "demo")
    assert got.sizes["step"] == 3 and "y" not in got and float(got["x"][0]) == 2.0
    assert not (tiny_copy / ".staging").exists()
    tree = xr.open_datatree(os.fspath(tiny_copy), engine="zarr")
    assert tree["analyses/demo"].sizes["step"] == 3  # consolidated metadata is current


def test_failed_write_leaves_previous_result(tiny_copy, monkeypatch):
    write_result(tiny_copy, "demo", result(1.0))

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_result(tiny_copy, "demo", result(2.0))
    monkeypatch.undo()
    xr.testing.assert_equal(read_result(tiny_copy, "demo"), result(1.0))
    assert not (tiny_copy / ".staging").exists()


def test_killed_write_leaves_previous_result(tiny_copy, tmp_path):
    write_result(tiny_copy, "demo", result(1.0))
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import pathlib, time, numpy as np, xarray as xr
        from ckpt_tools.store import write_result
        real = xr.Dataset.to_zarr
        def slow(self, *args, **kwargs):
            real(self, *args, **kwargs)  # the new result is half way into the store
            pathlib.Path({str(marker)!r}).touch()
            time.sleep(60)
        xr.Dataset.to_zarr = slow
        ds = xr.Dataset({{"x": ("step", np.full(4, 2.0))}}, coords={{"step": np.arange(4)}})
        write_result({str(tiny_copy)!r}, "demo", ds)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    xr.testing.assert_equal(read_result(tiny_copy, "demo"), result(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(os.fspath(tiny_copy), engine="zarr")
    assert tree["analyses/demo"].sizes["step"] == 5
    write_result(tiny_copy, "demo", result(3.0))  # the next write cleans up
    assert not (tiny_copy / ".staging").exists()


def test_bad_requests(tiny_copy):
    before = sorted(p.name for p in tiny_copy.iterdir())
    with pytest.raises(StoreError, match="no recorded history 'imp'"):
        write_result(tiny_copy, "demo", result(1.0), group="imp")
    with pytest.raises(StoreError, match="invalid analysis name"):
        write_result(tiny_copy, "a/b", result(1.0))
    with pytest.raises(StoreError, match="invalid group name"):
        write_result(tiny_copy, "x", result(1.0), group="../up")
    with pytest.raises(StoreError, match="no result 'analyses/missing'"):
        read_result(tiny_copy, "missing")
    assert sorted(p.name for p in tiny_copy.iterdir()) == before
