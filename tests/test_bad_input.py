"""Bad input: one clear line, a non-zero exit, and existing data byte for byte unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import TINY
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools import batches
from ckpt_tools.cli.app import app
from ckpt_tools.store import (
    StoreError,
    check_model,
    check_state_dict,
    committed_count,
    history_groups,
    store_info,
)
from ckpt_tools.train import TrainingDiverged, build, train

runner = CliRunner()
SMALL = ["--model", "convnet", "--width", "4", "--steps", "20", "--batch-size", "32",
         "--schedule", "0:21:1", "--eval-schedule", "0:21:10", "--quiet"]


def _hashes(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """An uninterrupted `ckpt record` of SMALL: the reference for the failure cases."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert runner.invoke(app, ["record", *SMALL, "--out", str(out)]).exit_code == 0
    return out


def _rows_match(path, ref):
    ds, rf = ckpt_tools.open_history(path), ckpt_tools.open_history(ref)
    steps = ds.step.values
    for name in ("params", "buffers", "grad_norm", "loss", "lr", "epoch"):
        got, want = ds[name].values, rf[name].sel(step=steps).values
        assert got.tobytes() == want.tobytes(), name
    return steps.tolist()


# -- paths -------------------------------------------------------------------------------
def test_missing_paths(tmp_path):
    missing = tmp_path / "nope.zarr"
    for call in (ckpt_tools.open_store, ckpt_tools.open_history, history_groups, store_info,
                 lambda p: ckpt_tools.load_state_dict(p, 0)):
        with pytest.raises(StoreError, match="does not exist"):
            call(missing)
    line = _one_line_error(runner.invoke(app, ["info", str(missing)]))
    assert "does not exist" in line
    line = _one_line_error(runner.invoke(app, ["record", *SMALL, "--out",
                                               str(tmp_path / "no" / "dir" / "r.zarr")]))
    assert "does not exist; create it first" in line


@pytest.mark.parametrize("where", ["/proc/ckpt-test.zarr", "FILE/run.zarr"])
def test_unwritable_paths(tmp_path, where):
    (tmp_path / "FILE").write_text("a file, not a directory")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    line = _one_line_error(runner.invoke(app, ["record", *SMALL, "--out", out]))
    assert out.split("/")[-2] in line or "ckpt-test" in line


def test_a_path_that_is_not_a_store(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    before = _hashes(folder)
    assert "not a Zarr v3 store" in _one_line_error(runner.invoke(app, ["info", str(folder)]))
    line = _one_line_error(runner.invoke(app, ["record", *SMALL, "--out", str(folder)]))
    assert "exists and is not a ckpt-tools store" in line
    line = _one_line_error(runner.invoke(app, ["record", "--resume", str(folder)]))
    assert "not a Zarr v3 store" in line
    assert _hashes(folder) == before
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w", zarr_format=3)
    before = _hashes(foreign)
    for args in (["info", str(foreign)], ["record", *SMALL, "--out", str(foreign)]):
        assert "not a ckpt-tools store" in _one_line_error(runner.invoke(app, args))
    assert _hashes(foreign) == before


# -- options -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "0:10:x"], "invalid schedule part '0:10:x'"),
        (["--eval-schedule", "log2:-4"], "log2:-4"),
        (["--model", "resnet7"], "resnet7"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--host-memory", "lots"], "--host-memory: invalid memory size 'lots'"),
        (["--host-memory", "1MiB"], "smallest budget that works is"),
        (["--include", "*attn*"], "no tensor of"),
    ],
)
def test_bad_options_create_nothing(tmp_path, args, message):
    out = tmp_path / "x.zarr"
    line = _one_line_error(runner.invoke(app, ["record", *SMALL, "--out", str(out), *args]), 2)
    assert message in line
    assert not out.exists()


def test_dataset_root_without_the_files(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "x.zarr"
    args = ["record", *SMALL, "--dataset", "fashion-mnist", "--data-root", str(empty),
            "--out", str(out)]
    line = _one_line_error(runner.invoke(app, args))
    assert "fashion-mnist" in line and str(empty) in line
    assert not out.exists()


# -- stores that do not fit --------------------------------------------------------------
def test_rewinding_into_another_architecture(tiny_run):
    wide, _ = build(dataclasses.replace(TINY, width=16))
    state = ckpt_tools.load_state_dict(tiny_run, 10)
    with pytest.raises(RuntimeError):  # what torch says: many lines
        wide.load_state_dict(state)
    with pytest.raises(StoreError, match=r"recorded from another architecture: parameter "
                                         r"'features.0.weight' has shape \(8, 1, 3, 3\) in the "
                                         r"store but \(16, 1, 3, 3\) in the model"):
        check_model(wide, tiny_run)
    with pytest.raises(StoreError, match="'features.0.weight' has shape"):
        check_state_dict(state, wide)
    with pytest.raises(StoreError, match="'features.0.weight' has shape"):
        train(dataclasses.replace(TINY, width=16), "unused.zarr", init=state, start_step=10)
    assert not __import__("pathlib").Path("unused.zarr").exists()
    linear = torch.nn.Linear(3, 2)
    with pytest.raises(StoreError, match="parameter 0 is 'features.0.weight' in the store"):
        check_model(linear, tiny_run)
    same, _ = build(TINY)
    check_model(same, tiny_run)
    check_state_dict(state, same)


def test_a_step_that_is_not_stored(tiny_run):
    with pytest.raises(StoreError, match=r"step 23 is not stored.*nearest stored steps: 19, 20, "
                                         r"25"):
        ckpt_tools.load_state_dict(tiny_run, 23)
    with pytest.raises(StoreError, match="step 9999 is not stored"):
        ckpt_tools.load_state_dict(tiny_run, 9999)


# -- damaged stores ----------------------------------------------------------------------
def test_a_corrupted_chunk(tiny_copy):
    chunk = tiny_copy / "train" / "params" / "c" / "0" / "0"
    chunk.write_bytes(b"\x00garbage" * 100)
    before = _hashes(tiny_copy)
    with pytest.raises(StoreError) as caught:
        ckpt_tools.load_state_dict(tiny_copy, 3)
    message = str(caught.value)
    assert "\n" not in message
    for part in ("group 'train'", "step 3", "'params'", "params/c/0/*", "damaged"):
        assert part in message
    ckpt_tools.load_state_dict(tiny_copy, 20)  # other chunks still read
    assert runner.invoke(app, ["info", str(tiny_copy)]).exit_code == 0  # reads no chunk of it
    assert _hashes(tiny_copy) == before


def test_a_corrupted_committed_chunk(tiny_copy):
    (tiny_copy / "train" / "committed" / "c" / "0").write_bytes(b"\x01\x02")
    before = _hashes(tiny_copy)
    for call in (ckpt_tools.open_history, ckpt_tools.open_store, store_info,
                 lambda p: ckpt_tools.load_state_dict(p, 0)):
        with pytest.raises(StoreError, match="committed"):
            call(tiny_copy)
    line = _one_line_error(runner.invoke(app, ["info", str(tiny_copy)]))
    assert "cannot read 'committed'" in line
    assert _hashes(tiny_copy) == before


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("target", "damage", "message", "info_fails"),
    [
        ("zarr.json", lambda p: p.write_bytes(p.read_bytes()[:40]), "not valid JSON", True),
        ("train/zarr.json", lambda p: p.write_bytes(p.read_bytes()[:40]), "not valid JSON",
         True),
        ("train/params/zarr.json", lambda p: p.write_bytes(b""), "not valid JSON", True),
        ("zarr.json", lambda p: _edit_json(
            p, lambda d: d["attributes"]["ckpt_tools"].update(format_version=99)), "newer", True),
        ("train/zarr.json", lambda p: _edit_json(
            p, lambda d: d["attributes"]["ckpt_tools"].pop("kind")), "not a recorded history",
         False),
        ("train/params/zarr.json", lambda p: _edit_json(
            p, lambda d: d["codecs"].append({"name": "numcodecs.pickle"})),
         "refusing to decode codec 'numcodecs.pickle'", True),
        ("train/params/zarr.json", lambda p: _edit_json(
            p, lambda d: d.update(shape=[25, 10])), "does not match the array width", False),
    ],
)
def test_truncated_or_edited_metadata(tiny_copy, target, damage, message, info_fails):
    consolidated = tiny_copy / "zarr.json"
    if target != "zarr.json":  # the consolidated copy would hide an edit below the root
        _edit_json(consolidated, lambda d: d.pop("consolidated_metadata", None))
    damage(tiny_copy / target)
    before = _hashes(tiny_copy)
    with pytest.raises(StoreError, match=message):
        ckpt_tools.load_state_dict(tiny_copy, 3)
    info = runner.invoke(app, ["info", str(tiny_copy)])
    if info_fails:  # otherwise `ckpt info` reads nothing that was damaged
        assert message in _one_line_error(info)
    assert _hashes(tiny_copy) == before


def test_unsafe_codec_in_consolidated_metadata(tiny_copy):
    def poison(doc):
        doc["consolidated_metadata"]["metadata"]["train/params"]["codecs"][0]["name"] = "evil"
    _edit_json(tiny_copy / "zarr.json", poison)
    with pytest.raises(StoreError, match="refusing to decode codec 'evil'"):
        ckpt_tools.open_store(tiny_copy)


# -- failures while recording ------------------------------------------------------------
def test_disk_full_mid_run_keeps_what_was_recorded(small_run, tiny_disk, monkeypatch):
    # The disk fills up (another program's file) while step 17's batch is drawn, once
    # rows 0-16 are committed; every later write of the writer processes and of the
    # training process fails with ENOSPC.
    out = tiny_disk / "r.zarr"
    filler = tiny_disk / "filler"
    real = batches.batch_for_step

    def fill_disk_at_17(data, step, **kwargs):
        if step == 17:
            deadline = time.monotonic() + 120
            while committed_count(out, "train")[1] < 17 and time.monotonic() < deadline:
                time.sleep(0.01)
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(bytes(1 << 16))
        return real(data, step, **kwargs)

    monkeypatch.setattr(batches, "batch_for_step", fill_disk_at_17)
    result = runner.invoke(app, ["record", *SMALL, "--out", str(out), "--resume-interval", "0"])
    monkeypatch.setattr(batches, "batch_for_step", real)
    line = _one_line_error(result)
    assert "No space left on device" in line and str(out) in line
    assert _rows_match(out, small_run) == list(range(17))
    # With space again, the run continues from its last resume point, bit for bit.
    filler.unlink()
    assert runner.invoke(app, ["record", "--resume", str(out), "--quiet"]).exit_code == 0
    assert _rows_match(out, small_run) == list(range(21))


def test_nan_loss_stops_with_a_clear_message_keeping_the_rows(small_run, tmp_path, monkeypatch):
    real = batches.batch_for_step

    def poisoned(data, step, **kwargs):
        x, y = real(data, step, **kwargs)
        return (x * float("nan") if step == 7 else x), y

    monkeypatch.setattr(batches, "batch_for_step", poisoned)
    out = tmp_path / "r.zarr"
    line = _one_line_error(runner.invoke(app, ["record", *SMALL, "--out", str(out)]))
    assert "loss became nan at step 7; steps up to 6 are stored in" in line
    assert _rows_match(out, small_run) == list(range(7))
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        train(dataclasses.replace(TINY, steps=8), tmp_path / "api.zarr")
    assert np.isfinite(ckpt_tools.open_history(tmp_path / "api.zarr").params.values).all()


def test_overwrite_of_a_damaged_group_is_allowed_and_other_groups_stay(tiny_copy, tmp_path):
    shutil.copytree(tiny_copy / "train", tiny_copy / "keep")
    _edit_json(tiny_copy / "zarr.json", lambda d: d.pop("consolidated_metadata", None))
    before = _hashes(tiny_copy / "keep")
    (tiny_copy / "train" / "params" / "c" / "0" / "0").write_bytes(b"junk")
    args = ["record", *SMALL, "--out", str(tiny_copy), "--overwrite"]
    assert runner.invoke(app, args).exit_code == 0
    assert _hashes(tiny_copy / "keep") == before
    assert ckpt_tools.open_history(tiny_copy).sizes["step"] == 21


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError(errno.ENOSPC, "full")])
def test_an_analysis_interrupted_half_way_keeps_the_previous_result(
    tiny_copy, monkeypatch, interruption
):
    import xarray as xr

    args = ["analyze", str(tiny_copy), "--only", "telemetry", "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    before = _hashes(tiny_copy)
    real = xr.Dataset.to_zarr

    def half_written(self, store, *a, **kw):
        real(self.isel({d: slice(0, 1) for d in self.dims}), store, *a, **kw)
        raise interruption  # Ctrl-C or a full disk in the middle of writing the result

    monkeypatch.setattr(xr.Dataset, "to_zarr", half_written)
    result = runner.invoke(app, args)
    line = _one_line_error(result, 130 if interruption is KeyboardInterrupt else 1)
    assert "interrupted" in line or "full" in line
    assert _hashes(tiny_copy) == before
