"""Telemetry against a slow, obviously correct numpy computation from the raw stored arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import ckpt_tools
from ckpt_tools.analyses import telemetry
from ckpt_tools.store import StoreError

RTOL = 1e-6  # float32 rounding of the stored weights' elementwise terms


def raw(path, group="train"):
    """Everything straight from Zarr, in memory, committed rows only."""
    g = zarr.open_group(str(path / group), mode="r")
    keep = np.asarray(g["committed"][:], dtype=bool)
    meta = g.attrs["ckpt_tools"]
    return {
        "steps": np.asarray(g["step"][:])[keep],
        "params": np.asarray(g["params"][:])[keep],
        "grad_norm": np.asarray(g["grad_norm"][:])[keep],
        "layers": meta["params"],
    }


def reference(r, weights="prunable"):
    """Every telemetry variable, the slow way, in float64, one layer at a time."""
    layers = [(i, p) for i, p in enumerate(r["layers"]) if weights == "all" or p["prunable"]]
    out = {"layer": [p["name"] for _, p in layers]}
    cols = [np.arange(p["offset"], p["offset"] + math.prod(p["shape"])) for _, p in layers]
    gaps = np.diff(r["steps"]).astype(float)

    def metrics(w):
        w0, wf = w[0], w[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "sign_change_fraction": np.mean(np.sign(w) * np.sign(w0) < 0, axis=1),
                "mean_abs_weight": np.mean(np.abs(w), axis=1),
                "l2_to_init": np.sqrt(np.sum((w - w0) ** 2, axis=1)),
                "l2_to_final": np.sqrt(np.sum((w - wf) ** 2, axis=1)),
                "cosine_to_init": w @ w0 / (np.linalg.norm(w, axis=1) * np.linalg.norm(w0)),
                "cosine_to_final": w @ wf / (np.linalg.norm(w, axis=1) * np.linalg.norm(wf)),
                "sign_flips_per_step": np.r_[
                    np.nan, np.mean(np.sign(w[1:]) * np.sign(w[:-1]) < 0, axis=1) / gaps],
                "distance_per_step": np.r_[
                    np.nan, np.sqrt(np.sum(np.diff(w, axis=0) ** 2, axis=1)) / gaps],
            }

    params = r["params"].astype(np.float64)
    whole = metrics(params[:, np.concatenate(cols)])
    per = [metrics(params[:, c]) for c in cols]
    gn = r["grad_norm"][:, [i for i, _ in layers]].astype(np.float64)
    whole["grad_norm"] = np.sqrt(np.sum(gn**2, axis=1))
    for name in whole:
        out[name] = whole[name]
        if name == "grad_norm":
            out[f"{name}_by_layer"] = gn
        else:
            out[f"{name}_by_layer"] = np.stack([m[name] for m in per], axis=1)
    return out


@pytest.fixture(scope="module")
def result(tiny_run):
    return telemetry.compute(tiny_run)


@pytest.mark.parametrize("weights", ["prunable", "all"])
def test_every_variable_matches_the_reference(tiny_run, weights, result):
    got = result if weights == "prunable" else telemetry.compute(tiny_run, weights="all")
    r = raw(tiny_run)
    ref = reference(r, weights)
    np.testing.assert_array_equal(got["step"].values, r["steps"])
    assert list(got["layer"].values) == ref.pop("layer")
    assert set(ref) == set(telemetry.VARIABLES) - {"weight_trace"} | set(telemetry.BY_LAYER)
    for name, expected in ref.items():
        np.testing.assert_allclose(got[name].values, expected, rtol=RTOL, atol=1e-12,
                                   err_msg=name)
        assert got[name].dtype == np.float64, name


def test_the_reference_is_not_trivial(result):
    # The tiny run moves: flips happen, distances grow, the first step has no previous one.
    assert result["sign_change_fraction"][-1] > 0.01
    assert result["l2_to_init"][-1] > 0 and result["l2_to_final"][-1] == 0
    assert result["cosine_to_init"][0] == 1 and result["cosine_to_final"][-1] == 1
    assert np.isnan(result["sign_flips_per_step"][0]) and np.isnan(result["distance_per_step"][0])
    assert result["sign_flips_per_step"][1:].max() > 0
    assert np.isnan(result["grad_norm"][0]) and (result["grad_norm"][1:] > 0).all()


def test_weight_traces_are_the_stored_values(tiny_run, result):
    r = raw(tiny_run)
    index = result["trace_param"].values
    assert len(index) == 10 and np.all(np.diff(index) > 0)
    np.testing.assert_array_equal(result["weight_trace"].values, r["params"][:, index])
    for i, layer in zip(index, result["trace_layer"].values, strict=True):
        spec = next(p for p in r["layers"] if p["name"] == layer)
        assert spec["prunable"] and spec["offset"] <= i < spec["offset"] + math.prod(spec["shape"])
    again = telemetry.compute(tiny_run, n_traces=10, seed=0)
    other = telemetry.compute(tiny_run, n_traces=10, seed=1)
    np.testing.assert_array_equal(again["trace_param"], index)
    assert not np.array_equal(other["trace_param"], index)
    assert telemetry.compute(tiny_run, n_traces=0).sizes["trace"] == 0


def test_any_chunking_gives_the_same_result(tiny_run, result):
    # Small, misaligned chunks: layers span chunks, steps span several chunk boundaries.
    history = ckpt_tools.open_history(tiny_run)
    for ds in (history.chunk(step=7, param=1000), history.load()):
        got = telemetry.compute(ds)
        xr.testing.assert_allclose(got, result, rtol=RTOL)
        np.testing.assert_array_equal(got["sign_change_fraction"], result["sign_change_fraction"])


@pytest.mark.parametrize("window", [1, 2, 3])
def test_windows_of_chunk_rows_give_the_one_pass_result(tiny_run, result, window, monkeypatch):
    """Reduced a few chunk rows per dask computation, each window's last rows carried to
    the next for the step-to-step terms, the result is the one of a single computation."""
    from ckpt_tools.analyses import _fused

    history = ckpt_tools.open_history(tiny_run).chunk(step=4, param=1000)
    assert history["params"].data.numblocks[0] > 2 * window  # several windows
    whole = telemetry.compute(history)
    real = _fused.layer_sums
    monkeypatch.setattr(telemetry, "layer_sums", lambda *a, **k: real(*a, **k, window=window))
    got = telemetry.compute(history)
    xr.testing.assert_identical(got, whole)
    xr.testing.assert_allclose(got, result, rtol=RTOL)


def test_accepts_path_tree_node_and_dataset(tiny_run, result):
    tree = ckpt_tools.open_store(tiny_run)
    for history in (str(tiny_run), tree["train"], ckpt_tools.open_history(tiny_run)):
        xr.testing.assert_identical(telemetry.compute(history), result)


def test_bad_input_gives_clear_errors(tiny_run):
    with pytest.raises(ValueError, match="weights must be one of"):
        telemetry.compute(tiny_run, weights="biases")
    with pytest.raises(ValueError, match="n_traces"):
        telemetry.compute(tiny_run, n_traces=-1)
    with pytest.raises(StoreError, match="not a recorded history"):
        telemetry.compute(ckpt_tools.open_store(tiny_run))
    with pytest.raises(StoreError, match="does not cover"):
        telemetry.compute(ckpt_tools.open_history(tiny_run).isel(param=slice(0, 10)))
    with pytest.raises(ValueError, match="no recorded steps"):
        telemetry.compute(ckpt_tools.open_history(tiny_run).isel(step=slice(0, 0)))


def test_one_read_per_chunk(tiny_run, monkeypatch):
    """Every chunk is read by the one task that reduces it; only the first and last chunk
    of each column are read once more, for the weights at the first and last step."""
    from ckpt_tools.analyses import _fused

    history = ckpt_tools.open_history(tiny_run).chunk(step=4, param=2000)
    blocks = history["params"].data.numblocks
    reads = []
    real = _fused._Chunk.__call__

    def counted(self):
        reads.append(self.chunk.key)
        return real(self)

    monkeypatch.setattr(_fused._Chunk, "__call__", counted)
    telemetry.compute(history)
    assert len(set(reads)) == blocks[0] * blocks[1]
    assert len(reads) == blocks[0] * blocks[1] + 2 * blocks[1]


def test_the_torch_reduction_matches_the_compiled_kernel(tiny_run, result, monkeypatch):
    """The torch code that reduces chunks on a GPU, run on the CPU, against the kernel."""
    from ckpt_tools.analyses import _fused

    real = _fused.layer_sums
    monkeypatch.setattr(telemetry, "layer_sums",
                        lambda *a, device=None: real(*a, device="cpu"))
    got = telemetry.compute(ckpt_tools.open_history(tiny_run).chunk(step=7, param=1000))
    xr.testing.assert_allclose(got, result, rtol=1e-12)
    np.testing.assert_array_equal(got["sign_flips_per_step"], result["sign_flips_per_step"])


def test_an_unavailable_device_is_refused(tiny_run):
    with pytest.raises(ValueError, match="device"):
        telemetry.compute(tiny_run, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            telemetry.compute(tiny_run, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reducing_on_cuda_gives_the_cpu_result(tiny_run, result):
    got = telemetry.compute(tiny_run, device="cuda")
    xr.testing.assert_allclose(got, result, rtol=1e-12)
    np.testing.assert_array_equal(got["sign_change_fraction"], result["sign_change_fraction"])
