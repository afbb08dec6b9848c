"""The chunk reader against zarr's own read path, for every codec chain a store may use."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec, TransposeCodec

import ckpt_tools
from ckpt_tools.store.chunks import ChunkReader, as_dask


def test_recorded_weights_read_exactly_as_zarr_reads_them(tiny_run):
    group = zarr.open_group(str(tiny_run / "train"), mode="r")
    for name in ("params", "buffers"):
        reader = ChunkReader(group[name])
        assert reader.fast
        np.testing.assert_array_equal(as_dask(group[name]).compute(), group[name][:])
    ds = ckpt_tools.open_history(tiny_run)
    keep = np.asarray(group["committed"][:], dtype=bool)
    np.testing.assert_array_equal(ds["params"].values, group["params"][:][keep])


def test_chunks_come_in_stored_time_major_order_without_a_copy(tiny_run):
    reader = ChunkReader(zarr.open_group(str(tiny_run / "train"), mode="r")["params"])
    block = reader.read(0, 0)
    assert block.shape == (16, reader.shape[1])
    assert block.T.flags.c_contiguous  # the stored order: steps fastest


@pytest.mark.parametrize("layout", ["blosc", "uncompressed", "sharded", "sharded-raw",
                                    "sharded-start", "row-major"])
def test_every_codec_chain_reads_as_zarr_does(tmp_path, layout):
    values = np.random.default_rng(0).standard_normal((22, 450)).astype(np.float32)
    values[3, 7], values[4, 8] = -0.0, np.inf
    kw = {"filters": [] if layout == "row-major" else [TransposeCodec(order=(1, 0))],
          "compressors": [BloscCodec(cname="lz4", shuffle="bitshuffle", typesize=4)]
          if layout in ("blosc", "sharded") else None}
    if layout.startswith("sharded"):
        kw["shards"] = (8, 300)
    arr = zarr.create_array(tmp_path / "a.zarr", shape=values.shape, chunks=(4, 100),
                            dtype="float32", fill_value=np.nan, **kw)
    if layout == "sharded-start":
        inner = [TransposeCodec(order=(1, 0)), BytesCodec()]
        arr = zarr.create_array(tmp_path / "b.zarr", shape=values.shape, chunks=(8, 300),
                                dtype="float32", fill_value=np.nan, filters=(),
                                compressors=(), serializer=ShardingCodec(
                                    chunk_shape=(4, 100), codecs=inner, index_location="start"))
        assert arr.metadata.codecs[0].index_location.value == "start"
    arr[:18] = values[:18]  # rows 18.. never written: the fill value
    arr = zarr.open_array(arr.store_path.store.root / arr.store_path.path, mode="r")
    reader = pickle.loads(pickle.dumps(ChunkReader(arr)))
    assert reader.fast
    lazy = as_dask(arr)
    np.testing.assert_array_equal(lazy.compute(), arr[:])
    np.testing.assert_array_equal(lazy[3:21, 50:333].compute(), arr[3:21, 50:333])
    assert np.isnan(lazy[20].compute()).all()


def test_an_unknown_codec_chain_falls_back_to_zarr(tmp_path):
    arr = zarr.create_array(tmp_path / "a.zarr", shape=(10, 30), chunks=(4, 16),
                            dtype="float32", fill_value=np.nan,
                            compressors=[zarr.codecs.ZstdCodec()])
    arr[:] = np.arange(300, dtype=np.float32).reshape(10, 30)
    assert not ChunkReader(arr).fast
    np.testing.assert_array_equal(as_dask(arr).compute(), arr[:])


@pytest.mark.parametrize("sharded", [False, True])
def test_a_store_that_is_not_a_folder_is_read_through_its_zarr_store(sharded):
    """Object stores (S3 through fsspec, ...) are read with ``store.get``, byte ranges too."""
    values = np.random.default_rng(1).standard_normal((20, 300)).astype(np.float32)
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=values.shape, chunks=(4, 100),
                            dtype="float32", fill_value=np.nan,
                            shards=(8, 200) if sharded else None,
                            filters=[TransposeCodec(order=(1, 0))],
                            compressors=[BloscCodec(cname="lz4", shuffle="bitshuffle",
                                                    typesize=4)])
    arr[:] = values
    reader = ChunkReader(arr)
    assert reader.fast and reader._root is None
    np.testing.assert_array_equal(as_dask(arr).compute(), values)
