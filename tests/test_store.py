"""The store as other readers see it: xarray without warnings, plain Zarr v3, provenance."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import assert_tensorstore_reads

import ckpt_tools
from ckpt_tools.models import prunable_parameter_names
from ckpt_tools.store import (
    FORMAT_VERSION,
    StoreError,
    check_group_name,
    last_evaluations,
    store_info,
)
from ckpt_tools.train import TrainConfig, build

STANDARD_CODECS = {"bytes", "transpose", "blosc", "zstd", "vlen-utf8"}


def test_xarray_opens_without_warnings(tiny_run):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(tiny_run, engine="zarr")
        ds = xr.open_zarr(tiny_run, group="train")
    assert "train" in tree.children
    assert ds.params.dims == ("step", "param")
    assert ds.grad_norm.dims == ("step", "layer")
    assert ds.params.dtype == np.float32


def test_open_store_is_lazy_and_shows_committed_steps(tiny_run):
    tree = ckpt_tools.open_store(tiny_run)
    ds = tree["train"].to_dataset()
    assert ds.params.chunks is not None  # dask-backed
    assert ds.step.values.tolist() == [*range(20), 20, 25, 30, 35, 40]
    assert bool(ds.committed.all())


def test_every_array_uses_standard_codecs_and_names_its_dims(tiny_run):
    for meta_path in tiny_run.rglob("zarr.json"):
        meta = json.loads(meta_path.read_text())
        if meta["node_type"] != "array":
            continue
        assert meta["zarr_format"] == 3
        assert meta["dimension_names"] and all(meta["dimension_names"])
        assert {c["name"] for c in meta["codecs"]} <= STANDARD_CODECS, meta_path
        blosc = [c for c in meta["codecs"] if c["name"] == "blosc"]
        assert all(c["configuration"]["shuffle"] == "bitshuffle" for c in blosc)


def test_another_zarr_v3_implementation_reads_every_numeric_array(tiny_run):
    # Sharded, uncompressed and format-1 stores: tests/test_store_layout.py.
    assert assert_tensorstore_reads(tiny_run) > 10


def test_layer_table_and_provenance(tiny_run):
    ds = ckpt_tools.open_history(tiny_run)
    meta = ds.attrs["ckpt_tools"]
    table = meta["params"]
    assert [t["name"] for t in table] == [str(n) for n in ds.layer.values]
    assert ds.layer_offset.values.tolist() == [t["offset"] for t in table]
    assert ds.layer_size.values.tolist() == [int(np.prod(t["shape"])) for t in table]
    assert ds.sizes["param"] == sum(ds.layer_size.values)
    flagged = ds.layer.values[ds.layer_prunable.values].tolist()
    model, _ = build(TrainConfig.from_dict(meta["config"]))
    assert flagged == prunable_parameter_names(model)  # conv and linear weights only
    assert meta["config"]["seed"] == 0 and meta["config"]["model"] == "convnet"
    assert ckpt_tools.Schedule.from_json(meta["schedule"]).steps[-1] == 40
    root = ckpt_tools.open_store(tiny_run).attrs["ckpt_tools"]
    assert root["format_version"] == FORMAT_VERSION
    assert set(root["versions"]) >= {"ckpt_tools", "torch", "zarr", "xarray"}
    assert "git_sha" in root


def test_store_info_reports_a_lossless_compression_ratio(tiny_run):
    info = store_info(tiny_run)
    (train,) = info["groups"]
    assert train["steps"] == 25 and train["first_step"] == 0 and train["last_step"] == 40
    stored = sum(f.stat().st_size for d in ("params", "buffers")
                 for f in (tiny_run / "train" / d).rglob("*") if f.is_file())
    assert train["stored_bytes"] == stored
    assert train["ratio"] == pytest.approx(stored / train["raw_bytes"])
    assert train["raw_bytes"] == 25 * (train["parameters"] + train["buffer_elements"]) * 4


def test_newer_format_is_refused(tiny_copy):
    root = zarr.open_group(str(tiny_copy), mode="r+")
    meta = dict(root.attrs["ckpt_tools"])
    meta["format_version"] = FORMAT_VERSION + 1
    root.attrs["ckpt_tools"] = meta
    with pytest.raises(StoreError, match="newer than this ckpt-tools reads"):
        ckpt_tools.open_store(tiny_copy)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "", "a//b", "a\\b"])
def test_group_names_cannot_leave_the_store(name):
    with pytest.raises(StoreError, match="invalid group name"):
        check_group_name(name)


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        ckpt_tools.open_store(tmp_path / "nope.zarr")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StoreError, match="not a Zarr v3 store"):
        ckpt_tools.open_store(tmp_path / "dir")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="not a ckpt-tools store"):
        ckpt_tools.open_store(tmp_path / "foreign.zarr")


def test_last_evaluations_are_the_last_completed_rows(tiny_copy):
    ds = ckpt_tools.open_history(tiny_copy)
    expected = {name: float(ds[name].isel(eval_step=-1)) for name in ("test_accuracy",
                                                                       "test_loss")}
    assert last_evaluations(tiny_copy, ["train"]) == {"train": expected}
    assert last_evaluations(tiny_copy, []) == {}
    with pytest.raises(StoreError, match="no group 'imp'"):
        last_evaluations(tiny_copy, ["train", "imp"])
