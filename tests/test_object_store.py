"""Stores in object storage (a real S3 server: moto's, on 127.0.0.1) and over HTTP.

Everything is compared bit for bit with the same store on local disk.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools.cli.app import app
from ckpt_tools.store import (
    HistoryWriter,
    LocationError,
    StoreError,
    as_location,
    committed_count,
    list_results,
    read_result,
    store_info,
    write_result,
)
from ckpt_tools.store.lease import LeaseLock

runner = CliRunner()
SMALL = ["--model", "convnet", "--width", "4", "--steps", "20", "--batch-size", "32",
         "--schedule", "0:21:1", "--eval-schedule", "0:21:10", "--quiet"]


def _upload(local, options) -> str:
    import s3fs

    url = f"s3://ckpt/copy-{uuid.uuid4().hex[:10]}/{local.name}"
    s3fs.S3FileSystem(**options, skip_instance_cache=True).put(
        str(local), url.removeprefix("s3://"), recursive=True)
    return url


@pytest.fixture(scope="module")
def s3_tiny(s3_server, tiny_run):
    """The shared tiny run, uploaded once to the S3 server (read it, do not write it)."""
    return as_location(_upload(tiny_run, s3_server), s3_server)


@pytest.fixture
def s3_copy(s3_server, tiny_run):
    """A private, writable copy of the tiny run on the S3 server."""
    return as_location(_upload(tiny_run, s3_server), s3_server)


def _one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def _same_result(a: xr.Dataset, b: xr.Dataset) -> None:
    for ds in (a, b):
        ds.attrs["ckpt_tools"].pop("created")
    xr.testing.assert_identical(a, b)


# -- reading -------------------------------------------------------------------------------
def test_reads_equal_local(s3_tiny, tiny_run):
    xr.testing.assert_identical(ckpt_tools.open_history(s3_tiny).load(),
                                ckpt_tools.open_history(tiny_run).load())
    tree = ckpt_tools.open_store(s3_tiny)
    assert tree["train"].sizes["step"] == 25
    for step in (0, 7, 40):
        got = ckpt_tools.load_state_dict(s3_tiny.url, step,
                                         storage_options=s3_tiny.storage_options)
        want = ckpt_tools.load_state_dict(tiny_run, step)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in got)
    remote, local = store_info(s3_tiny), store_info(tiny_run)
    assert remote["path"] == s3_tiny.url
    assert remote["groups"] == local["groups"]
    assert remote["size_on_disk"] == local["size_on_disk"]


def test_aws_environment(s3_tiny, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    ds = ckpt_tools.open_history(s3_tiny.url)  # no storage options: the environment only
    assert ds.sizes["step"] == 25


@pytest.fixture(scope="module")
def http_url(tiny_run):
    """The tiny run served read-only over HTTP by Python's own server."""
    handler = functools.partial(_QuietHandler, directory=str(tiny_run.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{tiny_run.name}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_https_style_urls_read_only(http_url, tiny_run):
    xr.testing.assert_identical(ckpt_tools.open_history(http_url).load(),
                                ckpt_tools.open_history(tiny_run).load())
    want = ckpt_tools.load_state_dict(tiny_run, 12)
    got = ckpt_tools.load_state_dict(http_url, 12)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(LocationError, match="read-only"):
        write_result(http_url, "demo", xr.Dataset({"x": ("s", np.arange(3.0))}))
    line = _one_line_error(runner.invoke(app, ["analyze", http_url, "--only", "telemetry",
                                               "--quiet"]))
    assert "read-only" in line


# -- results -------------------------------------------------------------------------------
def test_results_published_by_pointer(s3_copy):
    first = xr.Dataset({"x": ("step", np.arange(4.0))}, attrs={"note": "kept"})
    assert write_result(s3_copy, "demo", first) == "analyses/demo"
    got = read_result(s3_copy, "demo")
    assert got.attrs["note"] == "kept" and got["x"].values.tolist() == [0, 1, 2, 3]
    # A writer killed after writing its version but before the pointer: nothing changes.
    orphan = s3_copy.child("analyses/demo/vdeadbeef")
    (first * 7).to_zarr(orphan.zarr_store(read_only=False), mode="w-", zarr_format=3,
                        consolidated=False)
    assert read_result(s3_copy, "demo")["x"].values.tolist() == [0, 1, 2, 3]
    write_result(s3_copy, "demo", first * 2)
    assert read_result(s3_copy, "demo")["x"].values.tolist() == [0, 2, 4, 6]
    versions = [name for name, is_dir in s3_copy.child("analyses/demo").listdir() if is_dir]
    assert len(versions) == 1 and versions[0] != "vdeadbeef"  # old and orphaned removed
    tree = xr.open_datatree(s3_copy.zarr_store(read_only=True), engine="zarr")
    assert tree[f"analyses/demo/{versions[0]}"]["x"].values.tolist() == [0, 2, 4, 6]
    assert [r["path"] for r in list_results(s3_copy)] == ["analyses/demo"]


# -- the lock -------------------------------------------------------------------------------
_RACER = textwrap.dedent("""
    import json, sys, time
    from ckpt_tools.store import StoreError, as_location
    from ckpt_tools.store.lease import LeaseLock
    url, options, start = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    lock = LeaseLock(as_location(url, options), "group 'train'")
    time.sleep(max(0.0, start - time.time()))
    try:
        lock.acquire()
    except StoreError as exc:
        print("refused:", exc)
        sys.exit(0)
    print("acquired")
    time.sleep(3)
    lock.release()
""")


def test_two_writers_race_for_the_lock(s3_copy):
    group = s3_copy.child("train")
    start = time.time() + 4  # both processes are up and wait for the same moment
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, group.url,
                               json.dumps(dict(s3_copy.storage_options)), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs[0] == "acquired", outs
    assert outs[1].startswith("refused: group 'train' is being written by pid"), outs
    assert not group.exists(".lock")  # released


def test_live_lock_refuses_and_stale_lock_is_taken_over(s3_copy):
    group = s3_copy.child("train")
    fs = s3_copy.fs
    live = {"owner": "x", "pid": 4242, "host": "elsewhere", "since": "then", "command": "ckpt",
            "lease_s": 60}
    fs.pipe_file(f"{group.fs_path}/.lock", json.dumps(live).encode())
    with pytest.raises(StoreError, match="being written by pid 4242 on elsewhere"):
        HistoryWriter.reopen(s3_copy, "train")
    fs.pipe_file(f"{group.fs_path}/.lock", json.dumps({**live, "lease_s": 0.5}).encode())
    time.sleep(1.5)
    writer = HistoryWriter.reopen(s3_copy, "train")
    try:
        assert writer.lock.recovered["host"] == "elsewhere"
        with pytest.raises(StoreError, match="being written by pid"):
            HistoryWriter.reopen(s3_copy, "train")  # now we hold it, and renew it
    finally:
        writer.release()
    assert not group.exists(".lock")


def test_writer_that_lost_its_lease_does_not_commit(s3_copy):
    group = s3_copy.child("train")
    lock = LeaseLock(group, "group 'train'", lease_s=0.6).acquire()
    try:
        thief = {"owner": "y", "pid": 1, "host": "elsewhere", "lease_s": 60}
        s3_copy.fs.pipe_file(f"{group.fs_path}/.lock", json.dumps(thief).encode())
        time.sleep(1.0)  # a renewal finds the lock object changed
        with pytest.raises(StoreError, match="lost its lock"):
            lock.check()
    finally:
        lock.release()
    assert group.exists(".lock")  # the other writer's lock is left alone


# -- recording, killing, resuming -------------------------------------------------------------
def _ckpt(*args, env=None):
    cli = [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]
    return subprocess.Popen([*cli, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def test_record_kill_resume_bitwise_as_local(s3_url, s3_server, tmp_path):
    local = tmp_path / "ref.zarr"
    ref = _ckpt("record", *SMALL, "--out", str(local))
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    options = json.dumps(s3_server)
    victim = _ckpt("record", *SMALL, "--out", s3_url, "--storage-options", options,
                   "--resume-interval", "0")
    where = as_location(s3_url, s3_server)
    deadline = time.monotonic() + 600
    while victim.poll() is None and time.monotonic() < deadline:
        try:
            if committed_count(where, "train")[1] >= 16:
                break
        except StoreError:
            pass
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run finished before the kill"
    # Killed: only whole committed rows show, each equal to the local run's.
    shown, want = ckpt_tools.open_history(where), ckpt_tools.open_history(local)
    steps = shown["step"].values
    assert 16 <= len(steps) < 21
    for name in ("params", "buffers", "grad_norm", "loss", "lr", "epoch"):
        assert (shown[name].values.tobytes()
                == want[name].sel(step=steps).values.tobytes()), name
    # Resume with the credentials and endpoint from the AWS environment this time.
    env = {"AWS_ENDPOINT_URL": s3_server["endpoint_url"], "AWS_ACCESS_KEY_ID": s3_server["key"],
           "AWS_SECRET_ACCESS_KEY": s3_server["secret"]}
    resumed = _ckpt("record", "--resume", s3_url, "--quiet", env=env)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed {s3_url}" in out
    got = ckpt_tools.open_history(where).load()
    xr.testing.assert_identical(got.drop_attrs(), want.load().drop_attrs())
    assert not where.exists("train/.lock")


# -- analyze, report, info from the command line -----------------------------------------------
def test_analyze_report_info_cli(s3_copy, tiny_copy, tmp_path):
    options = json.dumps(dict(s3_copy.storage_options))
    for store in (s3_copy.url, str(tiny_copy)):
        extra = ["--storage-options", options] if store == s3_copy.url else []
        result = runner.invoke(app, ["analyze", store, "--only", "telemetry", "--quiet", *extra])
        assert result.exit_code == 0, result.output
    _same_result(read_result(s3_copy, "telemetry"), read_result(tiny_copy, "telemetry"))
    page = tmp_path / "report.html"
    result = runner.invoke(app, ["report", s3_copy.url, "-o", str(page),
                                 "--storage-options", options])
    assert result.exit_code == 0, result.output
    charted = _charted(page.read_text())  # the numbers on the page are the S3 store's
    history, stored = ckpt_tools.open_history(tiny_copy), read_result(s3_copy, "telemetry")
    loss = charted["accuracy-and-loss-loss"]["train (minibatch)"]
    np.testing.assert_array_equal(loss["step"], history["step"].values[1:])
    np.testing.assert_allclose(loss["value"], history["loss"].values[1:], rtol=1e-5)
    l2 = charted["telemetry-l2-distance"]["to init (step 0)"]
    np.testing.assert_array_equal(l2["step"], stored["step"].values)
    np.testing.assert_allclose(l2["value"], stored["l2_to_init"].values, rtol=1e-5, atol=1e-9)
    result = runner.invoke(app, ["info", s3_copy.url, "--json", "--storage-options", options])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["groups"][0]["steps"] == 25


def _charted(html: str) -> dict[str, dict[str, dict]]:
    """The data rows of every chart on a report page: ``{figure: {series: row}}``."""
    specs = json.loads(re.search(r"var specs = (\{.*?\});\n", html, re.DOTALL).group(1))
    names = dict(re.findall(r'class="chart" id="(fig-\d+)" data-name="\d+-([^"]+)"', html))
    return {names[fid]: {row["series"]: row for rows in spec.get("datasets", {}).values()
                         for row in rows if "series" in row}
            for fid, spec in specs.items()}


@pytest.fixture
def no_aws_env(monkeypatch, tmp_path):
    """No credentials anywhere botocore looks (environment, files, instance metadata)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_location_errors_exit_2(s3_server, s3_url, no_aws_env):
    good = json.dumps(s3_server)
    line = _one_line_error(runner.invoke(
        app, ["info", "s3://no-such-bucket/run.zarr", "--storage-options", good]))
    assert line == (f"error: bucket 'no-such-bucket' does not exist at "
                    f"{s3_server['endpoint_url']} (s3://no-such-bucket/run.zarr); create it "
                    "or fix the URL")
    line = _one_line_error(runner.invoke(
        app, ["record", *SMALL, "--out", "s3://no-such-bucket/run.zarr",
              "--storage-options", good]))
    assert "bucket 'no-such-bucket' does not exist" in line
    endpoint_only = json.dumps({"endpoint_url": s3_server["endpoint_url"]})
    line = _one_line_error(runner.invoke(
        app, ["analyze", s3_url, "--storage-options", endpoint_only]))
    assert line.startswith(f"error: no credentials to access {s3_url}: set AWS_ACCESS_KEY_ID")
    with __import__("socket").socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    line = _one_line_error(runner.invoke(
        app, ["record", *SMALL, "--out", s3_url, "--storage-options",
              json.dumps({**s3_server, "endpoint_url": closed})]))
    assert line.startswith(f"error: cannot reach the object store at {closed}")
    line = _one_line_error(runner.invoke(app, ["info", s3_url, "--storage-options", "[1]"]))
    assert "--storage-options must be a JSON object" in line
    assert not as_location(s3_url, s3_server).exists()  # nothing was created


# -- reading at scale: dask workers read their own chunks from S3 ----------------------------
_S3_ENDPOINTS = ("sorted({fs.storage_options.get('endpoint_url') "
                 "for fs in __import__('s3fs').S3FileSystem._cache.values()})")


def test_analyze_on_two_dask_worker_processes(s3_server, tmp_path, no_aws_env):
    from distributed import Client, LocalCluster, get_task_stream

    from ckpt_tools.synthetic import write_synthetic_history

    local = write_synthetic_history(tmp_path / "syn.zarr", n_steps=128, n_params=3000)
    url = _upload(local, s3_server)  # 8 chunks of 16 steps
    result = runner.invoke(app, ["analyze", str(local), "--only", "telemetry", "--quiet"])
    assert result.exit_code == 0, result.output
    # The workers start with no AWS variables: the storage options must travel with the tasks.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            result = runner.invoke(app, [
                "analyze", url, "--only", "telemetry", "--scheduler", cluster.scheduler_address,
                "--storage-options", json.dumps(s3_server), "--quiet"])
        assert result.exit_code == 0, result.output
        opened = client.run(eval, _S3_ENDPOINTS)
    assert len(opened) == 2
    assert all(s3_server["endpoint_url"] in endpoints for endpoints in opened.values()), opened
    assert len({task["worker"] for task in stream.data}) == 2
    _same_result(read_result(as_location(url, s3_server), "telemetry"),
                 read_result(local, "telemetry"))


# -- the other commands that take a store ----------------------------------------------------
def test_import_export_compact_with_urls(s3_server, s3_url, s3_tiny, tiny_run, tmp_path):
    options = json.dumps(s3_server)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    files = []
    for step in (0, 1, 2):
        with torch.no_grad():
            net[0].weight.add_(0.1)
        files.append(tmp_path / f"ckpt_{step}.pt")
        torch.save(net.state_dict(), files[-1])
    local = tmp_path / "imported.zarr"
    for out, extra in ((s3_url, ["--storage-options", options]), (str(local), [])):
        result = runner.invoke(app, ["import", *map(str, files), "--out", out, "--quiet", *extra])
        assert result.exit_code == 0, result.output
    xr.testing.assert_identical(
        ckpt_tools.open_history(s3_url, storage_options=s3_server).load().drop_attrs(),
        ckpt_tools.open_history(local).load().drop_attrs())
    for store, extra, name in ((s3_tiny.url, ["--storage-options", options], "s3.pt"),
                               (str(tiny_run), [], "local.pt")):
        result = runner.invoke(app, ["export", store, "--step", "7", "--format", "torch",
                                     "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    got = torch.load(tmp_path / "s3.pt", weights_only=True)
    want = torch.load(tmp_path / "local.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    line = _one_line_error(runner.invoke(app, ["compact", s3_tiny.url, "--storage-options",
                                               options]))
    assert "rewrites chunks in place on local disk" in line


def test_local_stores_never_import_s3fs(tiny_run):
    code = ("import sys, ckpt_tools; ckpt_tools.open_history(sys.argv[1]).load(); "
            "ckpt_tools.load_state_dict(sys.argv[1], 0); print('s3fs' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_run)], capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"
