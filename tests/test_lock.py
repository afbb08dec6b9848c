"""One writer per history group: refusals name the holder; dead holders are recovered."""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools.cli.app import app
from ckpt_tools.store import GroupLock, HistoryWriter, StoreError
from ckpt_tools.store.lock import LOCK_NAME, holder_of

runner = CliRunner()


def _hashes(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_second_writer_is_refused_with_the_holder_named(tiny_copy):
    first = HistoryWriter.reopen(tiny_copy, "train")
    try:
        holder = holder_of(tiny_copy / "train" / LOCK_NAME)
        assert holder["pid"] == os.getpid() and holder["host"] == platform.node()
        with pytest.raises(StoreError, match=rf"being written by pid {os.getpid()} on "):
            HistoryWriter.reopen(tiny_copy, "train")
        with pytest.raises(StoreError, match="being written by"):
            ckpt_tools.Recorder(tiny_copy, torch.nn.Linear(2, 2), "0:3:1", overwrite=True)
        before = _hashes(tiny_copy)
        result = runner.invoke(app, ["record", "--model", "convnet", "--steps", "3", "--quiet",
                                     "--out", str(tiny_copy), "--overwrite"])
        assert result.exit_code == 1
        assert f"being written by pid {os.getpid()}" in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert _hashes(tiny_copy) == before
    finally:
        first.close()
    assert not (tiny_copy / "train" / LOCK_NAME).exists()
    HistoryWriter.reopen(tiny_copy, "train").close()  # free again


def test_other_groups_can_be_written_meanwhile(tiny_copy):
    writer = HistoryWriter.reopen(tiny_copy, "train")
    try:
        with ckpt_tools.Recorder(tiny_copy, torch.nn.Linear(2, 2), "0:2:1", group="other") as rec:
            rec.record(0)
            rec.record(1)
    finally:
        writer.close()
    assert ckpt_tools.open_history(tiny_copy, "other").sizes["step"] == 2


def test_lock_of_a_killed_process_is_recovered(tmp_path):
    group_dir = tmp_path / "s.zarr" / "train"
    code = textwrap.dedent(f"""
        import sys, time
        from ckpt_tools.store import GroupLock
        lock = GroupLock({str(group_dir)!r}, "g").acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"being written by pid {child.pid}"):
            GroupLock(group_dir, "g").acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert holder_of(group_dir / LOCK_NAME)["pid"] == child.pid  # left behind
    lock = GroupLock(group_dir, "g").acquire()
    assert lock.recovered["pid"] == child.pid
    assert holder_of(group_dir / LOCK_NAME)["pid"] == os.getpid()
    lock.release()
    assert not (group_dir / LOCK_NAME).exists()


def test_readers_ignore_locks_and_temporary_files(tiny_copy):
    stray = tiny_copy / "train" / "params" / "c" / "0" / "0.0123abcd.partial"
    stray.write_bytes(b"half a chunk")
    (tiny_copy / "train" / "zarr.0123abcd.partial").write_bytes(b"{")
    writer = HistoryWriter.reopen(tiny_copy, "train")  # cleans up under the lock
    try:
        assert not stray.exists()
        assert not list((tiny_copy / "train").glob("*.partial"))
        assert (tiny_copy / "train" / LOCK_NAME).is_file()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tree = xr.open_datatree(tiny_copy, engine="zarr")
            ds = xr.open_zarr(tiny_copy, group="train")
        assert "train" in tree.children and ds.sizes["step"] == 25
        assert ckpt_tools.open_store(tiny_copy)["train"].sizes["step"] == 25
    finally:
        writer.close()


def test_a_garbage_lock_file_does_not_block(tmp_path):
    group_dir = tmp_path / "train"
    group_dir.mkdir()
    (group_dir / LOCK_NAME).write_bytes(b"\x00\xffnot json")
    with GroupLock(group_dir, "g") as lock:
        assert lock.held and lock.recovered == {}
