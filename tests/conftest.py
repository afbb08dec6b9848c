"""Shared fixtures: one tiny recorded run, reused read-only by every test that needs one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

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


def bits(values) -> np.ndarray:
    """The bit patterns of `values` (floats as unsigned integers), to compare exactly."""
    values = np.ascontiguousarray(values)
    return values.view(f"u{values.dtype.itemsize}") if values.dtype.kind == "f" else values


def assert_tensorstore_reads(store: Path, expected: dict | None = None) -> int:
    """Check that TensorStore reads every numeric array of `store` bit for bit as zarr does.

    `expected` maps ``"group/array"`` to values written by the test (the independent
    reference). Returns how many arrays were compared.
    """
    ts = pytest.importorskip("tensorstore", reason="tensorstore is in the test extras")
    seen = 0
    for meta_path in store.rglob("zarr.json"):
        meta = json.loads(meta_path.read_text())
        if meta["node_type"] != "array" or meta["data_type"] == "string":
            continue
        folder = meta_path.parent
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder)}}
        opened = ts.open(spec).result()
        theirs = opened.read().result()
        ours = zarr.open_array(str(folder), mode="r")[...]
        np.testing.assert_array_equal(bits(theirs), bits(ours), err_msg=str(folder))
        assert list(opened.domain.labels) == meta["dimension_names"]
        key = folder.relative_to(store).as_posix()
        if expected and key in expected:
            np.testing.assert_array_equal(bits(theirs), bits(expected[key]), err_msg=key)
        seen += 1
    return seen

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint: moto's server on 127.0.0.1 at a free port, for the session.

    Yields the storage options that reach it (``endpoint_url``, ``key``, ``secret``), with
    a bucket ``ckpt`` created. Fails (never skips, never falls back to local disk) when
    moto's server cannot start: `pip install -e .[test]` installs it.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"  # a pipe would fill up and block it
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"moto's S3 server did not start: {log.read_text()[-500:]}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto's S3 server did not answer within 60 s")
            time.sleep(0.1)
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    import s3fs

    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("ckpt")
    try:
        yield options
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_url(s3_server, request):
    """A fresh ``s3://ckpt/<test>/run.zarr`` URL on the moto server (nothing there yet)."""
    import uuid

    return f"s3://ckpt/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}/run.zarr"



@pytest.fixture
def tiny_disk(tmp_path):
    """An 8 MiB tmpfs to fill up (needs root to mount; skipped where that is refused)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
