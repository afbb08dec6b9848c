"""`ckpt analyze` end to end, and the same results on a dask.distributed cluster."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from distributed import Client, LocalCluster
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools.analyses import evaluate, registry, telemetry
from ckpt_tools.cli.app import app
from ckpt_tools.recorder import Recorder
from ckpt_tools.store import list_results, read_result

runner = CliRunner()


def data_of(ds: xr.Dataset) -> xr.Dataset:
    """A result without its provenance attributes (creation time, version)."""
    return ds.drop_attrs()


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster:
        yield cluster


def test_analyze_stores_every_registered_analysis(tiny_copy):
    result = runner.invoke(app, ["analyze", str(tiny_copy), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "telemetry: 19 variables over 25 steps" in result.output
    assert sorted(r["analysis"] for r in list_results(tiny_copy)) == [
        "evaluate", "pca", "spectra", "telemetry"]
    assert "compare: skipped (no second history" in result.output
    history = ckpt_tools.open_history(tiny_copy)
    stored = read_result(tiny_copy, "telemetry")
    xr.testing.assert_identical(data_of(stored), data_of(telemetry.compute(history)))
    assert stored["layer"].values.tolist() == telemetry.compute(history)["layer"].values.tolist()
    acc = read_result(tiny_copy, "evaluate")["test_accuracy"]
    np.testing.assert_allclose(acc.sel(step=[0, 20, 40]), history["test_accuracy"], rtol=1e-6)
    tree = ckpt_tools.open_store(tiny_copy)  # still a store that opens with its results
    assert set(tree["analyses"].children) == {"telemetry", "evaluate", "pca", "spectra"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = xr.open_datatree(str(tiny_copy), engine="zarr")
    assert raw["analyses/telemetry"].sizes["step"] == 25


def test_distributed_equals_threads(tiny_run, cluster):
    history = ckpt_tools.open_history(tiny_run)
    local = telemetry.compute(history)
    local_eval = evaluate.compute(history, steps=[0, 17, 40])
    with Client(cluster):
        remote = telemetry.compute(history)
        remote_eval = evaluate.compute(history, steps=[0, 17, 40])
    xr.testing.assert_identical(remote, local)
    xr.testing.assert_identical(remote_eval, local_eval)


def test_analyze_on_a_scheduler_address(tiny_copy, tiny_run, cluster):
    args = ["analyze", str(tiny_copy), "--only", "telemetry", "--scheduler",
            cluster.scheduler_address]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    xr.testing.assert_identical(data_of(read_result(tiny_copy, "telemetry")),
                                data_of(telemetry.compute(tiny_run)))
    assert [r["analysis"] for r in list_results(tiny_copy)] == ["telemetry"]


def test_analyze_with_local_worker_processes(tiny_copy, tiny_run):
    result = runner.invoke(app, ["analyze", str(tiny_copy), "--only", "telemetry",
                                 "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    xr.testing.assert_identical(data_of(read_result(tiny_copy, "telemetry")),
                                data_of(telemetry.compute(tiny_run)))


def test_rerun_replaces_and_only_selects(tiny_copy):
    assert runner.invoke(app, ["analyze", str(tiny_copy), "--only", "telemetry",
                               "--quiet"]).exit_code == 0
    first = read_result(tiny_copy, "telemetry").attrs["ckpt_tools"]["created"]
    assert runner.invoke(app, ["analyze", str(tiny_copy), "--only", "telemetry,telemetry",
                               "--quiet"]).exit_code == 0
    assert read_result(tiny_copy, "telemetry").attrs["ckpt_tools"]["created"] >= first
    assert [r["analysis"] for r in list_results(tiny_copy)] == ["telemetry"]


def test_eval_steps_selects_recorded_steps(tiny_copy):
    result = runner.invoke(app, ["analyze", str(tiny_copy), "--only", "evaluate",
                                 "--eval-steps", "0:41:10", "--quiet"])
    assert result.exit_code == 0, result.output
    assert read_result(tiny_copy, "evaluate")["step"].values.tolist() == [0, 10, 20, 30, 40]
    result = runner.invoke(app, ["analyze", str(tiny_copy), "--eval-steps", "every:other"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_custom_loop_runs_skip_what_does_not_apply(tmp_path):
    path = tmp_path / "custom.zarr"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with Recorder(path, model, [0, 1, 2]) as rec:
        for step in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            rec.record(step)
    result = runner.invoke(app, ["analyze", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "evaluate: skipped" in result.output
    assert sorted(r["analysis"] for r in list_results(path)) == ["pca", "spectra", "telemetry"]
    result = runner.invoke(app, ["analyze", str(path), "--only", "evaluate"])
    assert result.exit_code != 0 and "custom loop" in result.output


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--only", "nope"], 2, "unknown analysis 'nope'; registered: telemetry, evaluate, pca"),
    (["--device", "tpu"], 2, "unknown --device 'tpu'"),
    (["--against", "missing.zarr"], 1, "missing.zarr does not exist"),
    (["--against", ":imp/level_1"], 1, "has no group 'imp/level_1'"),
    (["--against", "x.zarr:"], 2, "empty group after ':'"),
    (["--workers", "0"], 2, "--workers must be at least 1"),
    (["--workers", "1", "--scheduler", "tcp://127.0.0.1:1"], 2, "exclude each other"),
    (["--group", "imp"], 1, "has no group 'imp'"),
])
def test_bad_input_is_one_line_and_changes_nothing(tiny_copy, args, code, message):
    before = sorted(p.relative_to(tiny_copy) for p in tiny_copy.rglob("*"))
    result = runner.invoke(app, ["analyze", str(tiny_copy), *args])
    assert result.exit_code == code
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.relative_to(tiny_copy) for p in tiny_copy.rglob("*")) == before


def test_missing_store(tmp_path):
    result = runner.invoke(app, ["analyze", str(tmp_path / "none.zarr")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_registry_and_charts(tiny_run):
    assert registry.names() == ["telemetry", "evaluate", "pca", "spectra", "compare"]
    assert registry.get("telemetry") is telemetry and registry.get("evaluate") is evaluate
    with pytest.raises(KeyError, match="unknown analysis"):
        registry.get("nope")
    result = telemetry.compute(tiny_run)
    for name, ds in (("telemetry", result), ("evaluate", evaluate.compute(tiny_run, steps=[0]))):
        spec = registry.chart(name, ds).to_dict()
        assert "hconcat" in spec or "vconcat" in spec


@pytest.mark.parametrize("distributed", [False, True])
def test_progress_counts_every_task(tiny_run, cluster, distributed):
    from rich.progress import Progress

    from ckpt_tools.cli.dask_progress import track

    history = ckpt_tools.open_history(tiny_run)
    with Progress(disable=True) as bar:
        task = bar.add_task("telemetry", total=None)
        if distributed:
            with Client(cluster) as client, track(bar, task, client):
                telemetry.compute(history)
        else:
            with track(bar, task):
                telemetry.compute(history)
        state = bar.tasks[0]
    assert state.total and state.total > 10 and state.completed == state.total


def test_against_compares_two_histories_and_stores_the_result(tiny_copy, tiny_run):
    result = runner.invoke(app, ["analyze", str(tiny_copy), "--only", "compare",
                                 "--against", f"{tiny_run}:train", "--quiet"])
    assert result.exit_code == 0, result.output
    stored = read_result(tiny_copy, "compare")
    assert stored.attrs["ckpt_tools"]["options"]["against"] == f"{tiny_run}:train"
    assert (stored["l2_distance"] == 0).all() and (stored["cosine_similarity"] == 1).all()


def test_device_cuda(tiny_copy):
    """Without a GPU, --device cuda is refused in one line; with one, it gives the CPU's
    telemetry."""
    result = runner.invoke(app, ["analyze", str(tiny_copy), "--only", "telemetry",
                                 "--device", "cuda", "--quiet"])
    if not torch.cuda.is_available():
        assert result.exit_code == 2 and "no CUDA device" in result.output
        return
    assert result.exit_code == 0, result.output
    xr.testing.assert_allclose(data_of(read_result(tiny_copy, "telemetry")),
                               data_of(telemetry.compute(tiny_copy)), rtol=1e-12)
