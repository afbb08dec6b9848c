"""Store format 2: the codecs of `params`/`buffers`, sharding of big rows, format 1 still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_tensorstore_reads, bits
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools.cli.app import app
from ckpt_tools.store import (
    FORMAT_VERSION,
    HistoryWriter,
    StoreError,
    open_history,
    read_row,
    store_info,
)
from ckpt_tools.store.layout import PARAM_CHUNK, SHARD_AFTER, row_array_layout
from ckpt_tools.tensors import TensorSpec
from ckpt_tools.train import TrainConfig, train

FORMAT1 = Path(__file__).parent / "data" / "format1.zarr"
"""A store written by ckpt-tools 0.1.0 in format 1: `ckpt record --model convnet --width 4
--steps 12 --batch-size 32 --schedule 0:13:1 --eval-schedule 0:13:6`, one torch thread."""

FORMAT1_CONFIG = TrainConfig(model="convnet", dataset="digits", width=4, steps=12,
                             batch_size=32, schedule="0:13:1", eval_schedule="0:13:6", seed=0)

runner = CliRunner()


def _codecs(store: Path, array: str) -> list:
    return json.loads((store / array / "zarr.json").read_text())["codecs"]


def test_row_layout_shards_only_big_rows_and_only_in_format_2():
    small = row_array_layout(272_474, 16)
    assert small["shards"] is None and small["chunks"] == (16, PARAM_CHUNK)
    n = 1_000_000_000  # a 1B-parameter model: 3,815 chunks per time block unsharded
    big = row_array_layout(n, 16)
    assert big["chunks"] == (16, PARAM_CHUNK)
    assert big["shards"][0] == 16  # one time block per shard, never several
    assert big["shards"][1] % PARAM_CHUNK == 0
    assert 16 * big["shards"][1] * 4 <= 1 << 29
    one_row = row_array_layout(n, 1)  # the block a small host-memory budget allows
    assert -(-n // one_row["shards"][1]) <= 8  # files per block
    assert row_array_layout(n, 16, format_version=1)["shards"] is None
    edge = (SHARD_AFTER + 1) * PARAM_CHUNK
    assert row_array_layout(edge - PARAM_CHUNK, 16)["shards"] is None
    assert row_array_layout(edge, 16)["shards"] is not None


def _big_history(path: Path, *, codec: str, n_steps: int = 17, n_params: int = 700_000):
    """A history written row block by row block from known random data."""
    rng = np.random.default_rng(1)
    specs = [TensorSpec("w", (n_params - 10,), 0, "float32", True),
             TensorSpec("b", (10,), n_params - 10, "float32", False)]
    walk = rng.standard_normal(n_params).astype(np.float32)
    rows = np.stack([walk + np.float32(1e-3) * i * rng.standard_normal(n_params,
                                                                       dtype=np.float32)
                     for i in range(n_steps)])
    grads = rng.random((n_steps, 2), dtype=np.float32)
    writer = HistoryWriter.create(
        path, "train", steps=list(range(n_steps)), params=specs, buffers=[],
        attrs={"config": {}}, root_attrs={}, codec=codec,
        shard_bytes=16 * 2 * PARAM_CHUNK * 4,  # two chunks per shard: several shards
    )
    assert writer.file_shape("params") == (16, 2 * PARAM_CHUNK)  # what one file covers
    try:
        for start in range(0, n_steps, 16):
            stop = min(start + 16, n_steps)
            writer.write_rows(start, rows[start:stop], np.empty((stop - start, 0), np.float32),
                              grads[start:stop])
            writer.commit(np.arange(start, stop))
    finally:
        writer.close()
    return rows, grads


@pytest.mark.parametrize("codec", ["lz4", "none"])
def test_big_rows_are_sharded_one_time_block_per_shard_and_tensorstore_reads_them(
    tmp_path, codec, monkeypatch
):
    # Rows of 3 chunks count as big here, to keep the test small and quick.
    monkeypatch.setattr("ckpt_tools.store.layout.SHARD_AFTER", 1)
    store = tmp_path / "big.zarr"
    rows, grads = _big_history(store, codec=codec)
    (sharding,) = _codecs(store, "train/params")
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [16, PARAM_CHUNK]
    inner = {c["name"]: c.get("configuration") for c in sharding["configuration"]["codecs"]}
    assert inner["transpose"] == {"order": [1, 0]}
    assert inner["blosc"]["clevel"] == (0 if codec == "none" else 5)
    # 700k weights = 3 chunks per time block, two per shard: 2 files per block.
    assert sorted(p.name for p in (store / "train/params/c/0").iterdir()) == ["0", "1"]
    assert sorted(p.name for p in (store / "train/params/c/1").iterdir()) == ["0", "1"]
    compared = assert_tensorstore_reads(store, {"train/params": rows, "train/grad_norm": grads})
    assert compared >= 5
    ds = open_history(store)
    np.testing.assert_array_equal(bits(ds.params.values), bits(rows))
    assert store_info(store)["groups"][0]["codec"] == codec


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, one_thread) -> dict[str, Path]:
    """`FORMAT1_CONFIG` recorded now, as the format-1 store was (one thread), per codec."""
    out = tmp_path_factory.mktemp("format2")
    stores = {codec: out / f"{codec}.zarr" for codec in ("lz4", "none")}
    for codec, store in stores.items():
        train(FORMAT1_CONFIG, store, codec=codec)
    return stores


def test_uncompressed_codec_records_the_samebits(recorded):
    raw, lz4 = recorded["none"], recorded["lz4"]
    for array in ("params", "buffers"):
        blosc = _codecs(raw, f"train/{array}")[-1]
        assert blosc["name"] == "blosc" and blosc["configuration"]["clevel"] == 0
        chunk = (raw / "train" / array / "c" / "0" / "0").read_bytes()
        assert chunk[2] & 0x02  # blosc header: stored as is (memcpy), not compressed
    a, b = open_history(lz4), open_history(raw)
    for name in ("params", "buffers", "grad_norm", "loss", "test_accuracy"):
        np.testing.assert_array_equal(bits(a[name].values), bits(b[name].values), name)
    info_raw, info_lz4 = store_info(raw)["groups"][0], store_info(lz4)["groups"][0]
    assert info_raw["codec"] == "none" and info_lz4["codec"] == "lz4"
    assert info_raw["stored_bytes"] > info_lz4["stored_bytes"]


def test_unknown_codec_is_refused_before_anything_is_written(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(StoreError, match="unknown codec 'zstd': use lz4 or none"):
        ckpt_tools.Recorder(tmp_path / "x.zarr", model, [0, 1], codec="zstd")
    assert not (tmp_path / "x.zarr").exists()


def test_resume_refuses_a_codec(tmp_path):
    result = runner.invoke(app, ["record", "--resume", str(tmp_path / "x.zarr"),
                                 "--codec", "none"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --resume keeps the codec the run was recorded with; drop --codec"]


def test_format_1_store_reads_bit_for_bit_like_a_new_recording(recorded):
    assert store_info(FORMAT1)["format_version"] == 1 < FORMAT_VERSION
    assert assert_tensorstore_reads(FORMAT1) > 10
    new = recorded["lz4"]
    assert store_info(new)["format_version"] == FORMAT_VERSION
    old_ds, new_ds = open_history(FORMAT1), open_history(new)
    assert old_ds.sizes["step"] == new_ds.sizes["step"] == 13
    for name in ("params", "buffers", "grad_norm", "loss", "lr", "epoch", "test_loss",
                 "test_accuracy", "layer_offset"):
        np.testing.assert_array_equal(bits(old_ds[name].values), bits(new_ds[name].values),
                                      name)
    tree = ckpt_tools.open_store(FORMAT1)
    assert tree["train"].to_dataset().sizes["step"] == 13
    p_old, b_old, specs, _ = read_row(FORMAT1, 7)
    p_new, b_new, _, _ = read_row(new, 7)
    assert bits(p_old).tobytes() == bits(p_new).tobytes()
    assert [s.name for s in specs] == [str(n) for n in new_ds.layer.values]
    result = runner.invoke(app, ["info", str(FORMAT1)])
    assert result.exit_code == 0 and "format 1" in result.output


def test_a_group_added_to_a_format_1_store_keeps_format_1(tmp_path, monkeypatch):
    monkeypatch.setattr("ckpt_tools.store.layout.SHARD_AFTER", 1)
    store = tmp_path / "old.zarr"
    shutil.copytree(FORMAT1, store)
    rows, _ = _big_history_in(store)
    root = json.loads((store / "zarr.json").read_text())
    assert root["attributes"]["ckpt_tools"]["format_version"] == 1
    assert [c["name"] for c in _codecs(store, "extra/params")] == ["transpose", "bytes",
                                                                    "blosc"]
    np.testing.assert_array_equal(bits(open_history(store, "extra").params.values),
                                  bits(rows))


def _big_history_in(store: Path):
    n = 2 * PARAM_CHUNK + 7  # sharded in format 2 with SHARD_AFTER = 1
    rows = np.random.default_rng(2).standard_normal((3, n)).astype(np.float32)
    specs = [TensorSpec("w", (n,), 0, "float32", True)]
    writer = HistoryWriter.create(store, "extra", steps=[0, 1, 2], params=specs, buffers=[],
                                  attrs={"config": {}}, root_attrs={})
    try:
        writer.write_rows(0, rows, np.empty((3, 0), np.float32))
        writer.commit(np.arange(3))
    finally:
        writer.close()
    return rows, specs
