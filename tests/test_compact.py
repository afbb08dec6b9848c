"""`ckpt compact`: uncompressed histories become the default layout in place, bit for bit."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr.storage._local as zarr_local
from conftest import assert_tensorstore_reads, bits
from typer.testing import CliRunner

from ckpt_tools.cli.app import app
from ckpt_tools.store import HistoryWriter, StoreError, open_history, store_info
from ckpt_tools.store.compact import PROGRESS_NAME, compact, needs_compaction
from ckpt_tools.store.layout import PARAM_CHUNK
from ckpt_tools.tensors import TensorSpec

BENCH = Path(__file__).resolve().parents[1] / "bench"
runner = CliRunner()


def _rows(n_steps: int, n_params: int, n_buffers: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    params = np.cumsum(rng.standard_normal((n_steps, n_params), dtype=np.float32)
                       * np.float32(1e-3), axis=0, dtype=np.float32)
    params[2, :3] = np.array([0x7FC00001, 0xFFC00000, 0x80000000],
                             np.uint32).view(np.float32)  # odd NaNs, a negative zero
    return {"params": params,
            "buffers": rng.standard_normal((n_steps, n_buffers), dtype=np.float32),
            "grad_norm": rng.random((n_steps, 1), dtype=np.float32)}


def _write(path: Path, rows: dict[str, np.ndarray], codec: str, *, commit_until: int) -> None:
    n_steps, n_p = rows["params"].shape
    specs = [TensorSpec("w", (n_p,), 0, "float32", True)]
    buffers = [TensorSpec("bn.running_var", (rows["buffers"].shape[1],), 0, "float32", False)]
    writer = HistoryWriter.create(path, "train", steps=list(range(n_steps)), params=specs,
                                  buffers=buffers, attrs={"config": {}}, root_attrs={},
                                  codec=codec)
    try:
        for start in range(0, commit_until, 16):
            stop = min(start + 16, commit_until)
            writer.write_rows(start, rows["params"][start:stop], rows["buffers"][start:stop],
                              rows["grad_norm"][start:stop])
            writer.commit(np.arange(start, stop))
    finally:
        writer.close()


def _files(store: Path) -> dict[str, bytes]:
    return {f.relative_to(store).as_posix(): f.read_bytes()
            for name in ("params", "buffers") for f in sorted((store / "train" / name).rglob("*"))
            if f.is_file()}


@pytest.fixture(params=["unsharded", "sharded"])
def pair(request, tmp_path, monkeypatch) -> tuple[Path, Path, dict]:
    """The same rows written uncompressed and with the default codec; 20 of 37 committed."""
    if request.param == "sharded":  # rows of 3 chunks count as big here: small and quick
        monkeypatch.setattr("ckpt_tools.store.layout.SHARD_AFTER", 1)
    rows = _rows(37, 2 * PARAM_CHUNK + 1000, 300)
    raw, lz4 = tmp_path / "raw.zarr", tmp_path / "lz4.zarr"
    _write(raw, rows, "none", commit_until=20)
    _write(lz4, rows, "lz4", commit_until=20)
    return raw, lz4, rows


def test_compaction_gives_the_bytes_of_recording_with_the_default_codec(pair):
    raw, lz4, rows = pair
    before = open_history(raw)
    assert needs_compaction(raw) and not needs_compaction(lz4)
    report = compact(raw)
    assert report.arrays == ("params", "buffers") and not report.resumed
    assert report.bytes_after < report.bytes_before
    assert _files(raw) == _files(lz4)  # chunk, shard and metadata files, byte for byte
    after = open_history(raw)
    for name in ("params", "buffers", "grad_norm"):
        assert bits(after[name].values).tobytes() == bits(before[name].values).tobytes()
        np.testing.assert_array_equal(bits(after[name].values), bits(rows[name][:20]))
    assert store_info(raw)["groups"][0]["codec"] == "lz4"
    assert not (raw / "train" / PROGRESS_NAME).exists() and not needs_compaction(raw)
    assert compact(raw).arrays == ()  # nothing left to do


def test_an_interrupted_compaction_reads_the_same_and_continues(pair):
    raw, lz4, rows = pair
    seen = []

    def stop_after_two(array, size):
        seen.append(array)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compact(raw, on_file=stop_after_two)
    assert (raw / "train" / PROGRESS_NAME).is_file() and needs_compaction(raw)
    assert json.loads((raw / "train" / PROGRESS_NAME).read_text())["next"]["params"] > 0
    ds = open_history(raw)
    for name in ("params", "buffers"):
        np.testing.assert_array_equal(bits(ds[name].values), bits(rows[name][:20]))
    assert_tensorstore_reads(raw, {"train/params": _committed(raw, rows["params"])})
    report = compact(raw)
    assert report.resumed and report.files >= 1
    assert _files(raw) == _files(lz4)


def _committed(store: Path, values: np.ndarray) -> np.ndarray:
    out = np.full_like(values, np.nan)
    out[:20] = values[:20]
    return out


def test_compaction_waits_for_the_writer(tmp_path):
    rows = _rows(5, 100, 3)
    _write(tmp_path / "r.zarr", rows, "none", commit_until=5)
    writer = HistoryWriter.reopen(tmp_path / "r.zarr", "train")
    try:
        with pytest.raises(StoreError, match="is being written by pid"):
            compact(tmp_path / "r.zarr")
    finally:
        writer.release()
    assert compact(tmp_path / "r.zarr").arrays == ("params", "buffers")


def test_cli_compacts_every_history_and_says_what_it_did(tmp_path):
    rows = _rows(5, 100, 3)
    store = tmp_path / "r.zarr"
    _write(store, rows, "none", commit_until=5)
    result = runner.invoke(app, ["compact", str(store)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("train: params, buffers compressed, 2 files, ")
    again = runner.invoke(app, ["compact", str(store), "--group", "train"])
    assert again.exit_code == 0 and "nothing to compact" in again.output
    missing = runner.invoke(app, ["compact", str(store), "--group", "imp"])
    assert missing.exit_code == 1
    assert missing.output.strip() == (f"error: {store} has no group 'imp' (recorded "
                                      "histories: train)")


def test_a_full_disk_stops_with_one_line_and_the_history_intact(tmp_path, monkeypatch):
    rows = _rows(40, 300, 3)
    store, reference = tmp_path / "r.zarr", tmp_path / "lz4.zarr"
    _write(store, rows, "none", commit_until=40)
    _write(reference, rows, "lz4", commit_until=40)
    real_put = zarr_local._put

    def full_disk(path, value, exclusive=False):
        if "train/params/c/1/" in str(path):  # the second chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", full_disk)
    result = runner.invoke(app, ["compact", str(store)])
    monkeypatch.setattr(zarr_local, "_put", real_put)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: compacting {store} failed: [Errno 28] No space left on device; it reads as "
        f"before; fix that and run `ckpt compact {store}` again"]
    np.testing.assert_array_equal(bits(open_history(store).params.values), bits(rows["params"]))
    assert runner.invoke(app, ["compact", str(store)]).exit_code == 0
    assert _files(store) == _files(reference)


@pytest.mark.slow
def test_killed_compaction_never_changes_what_readers_see(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH / "kill_compact.py"), "--trials", "2", "--steps", "17",
         "--params", "600000", "--buffers", "1000", "--sigint-every", "2",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "kills: 2  (SIGKILL 1, SIGINT 1" in out
    assert "reads altered: 0  failed opens: 0  stores over raw size + largest file: 0" in out
    assert "files byte-identical to recording with lz4: False" not in out
