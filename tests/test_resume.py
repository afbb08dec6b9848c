"""Exact resume: a run continued from a resume point equals the uninterrupted run bitwise."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import signal

import numpy as np
import pytest
import torch
import zarr
from conftest import TINY
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools import batches
from ckpt_tools.cli.app import app
from ckpt_tools.resume import TrainingInterrupted, capture, restore, resume_status
from ckpt_tools.store import StoreError, read_group_meta, read_resume_point
from ckpt_tools.train import build, train

runner = CliRunner()
SMALL = ["--model", "convnet", "--width", "4", "--steps", "12", "--batch-size", "32",
         "--schedule", "0:13:1", "--eval-schedule", "0:13:6", "--quiet"]


class _Crash(Exception):
    pass


def _crash_at(step):
    def on_step(s, loss):
        if s == step:
            raise _Crash(step)
    return on_step


def _hashes(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_history(a, b, group="train"):
    """Every array of two history groups, byte for byte (the reference is independent)."""
    x = zarr.open_group(str(a / group), mode="r", use_consolidated=False)
    y = zarr.open_group(str(b / group), mode="r", use_consolidated=False)
    assert sorted(x.array_keys()) == sorted(y.array_keys())
    for name in x.array_keys():
        assert x[name][...].tobytes() == y[name][...].tobytes(), name


def test_resumed_run_is_bitwise_identical(tiny_run, tmp_path):
    out = tmp_path / "r.zarr"
    with pytest.raises(_Crash):
        train(TINY, out, resume_interval=0, on_step=_crash_at(23))
    point = read_resume_point(out, "train")
    assert point.step == 22 and all(point.has_momentum)
    assert point.info["last_eval"]  # the evaluation at step 20
    shown = ckpt_tools.open_history(out).step.values.tolist()
    assert shown == list(range(21))
    result = train(TINY, out, resume=True)
    assert result.last_step == 40 and result.final_eval
    assert_same_history(tiny_run, out)
    meta = read_group_meta(out, "train")
    assert meta["complete"] and meta["resume"] is None
    assert "resume_params" not in zarr.open_group(str(out / "train"), mode="r")


def test_resume_without_a_point_restarts_and_rewrites_identical_rows(tiny_run, tmp_path):
    out = tmp_path / "r.zarr"
    with pytest.raises(_Crash):
        train(TINY, out, resume_interval=None, on_step=_crash_at(6))
    assert read_resume_point(out, "train") is None
    train(TINY, out, resume=True)
    assert_same_history(tiny_run, out)


def test_capture_restore_continues_sgd_exactly():
    # Independent reference: one uninterrupted loop vs a loop restored into fresh objects.
    cfg = dataclasses.replace(TINY, steps=6)

    def loop(model, opt, steps, data):
        for s in steps:
            x, y = batches.batch_for_step(data, s, batch_size=cfg.batch_size, seed=0)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def fresh():
        model, data = build(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return model, opt, data

    model, opt, data = fresh()
    loop(model, opt, range(1, 4), data)
    point = capture(3, model, opt)
    loop(model, opt, range(4, 7), data)
    other, other_opt, _ = fresh()
    restore(point, other, other_opt)
    loop(other, other_opt, range(4, 7), data)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_ctrl_c_stops_with_a_resume_point_and_resume_finishes_bitwise(tmp_path, monkeypatch):
    ref = tmp_path / "ref.zarr"
    assert runner.invoke(app, ["record", *SMALL, "--out", str(ref)]).exit_code == 0
    real = batches.batch_for_step

    def ctrl_c_at_7(data, step, **kwargs):
        if step == 7:
            signal.raise_signal(signal.SIGINT)
        return real(data, step, **kwargs)

    out = tmp_path / "run.zarr"
    monkeypatch.setattr(batches, "batch_for_step", ctrl_c_at_7)
    stopped = runner.invoke(app, ["record", *SMALL, "--out", str(out)])
    monkeypatch.setattr(batches, "batch_for_step", real)
    assert stopped.exit_code == 130, stopped.output
    assert f"ckpt record --resume {out}" in stopped.output
    assert len(stopped.output.strip().splitlines()) == 1
    assert ckpt_tools.open_history(out).step.values.tolist() == list(range(8))
    assert read_resume_point(out, "train").step == 7
    status = resume_status(out)
    assert (status.from_step, status.stored_steps, status.complete) == (7, 8, False)
    resumed = runner.invoke(app, ["record", "--resume", str(out), "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert "from step 7" in resumed.output and "up to step 12" in resumed.output
    assert_same_history(ref, out)
    before = _hashes(out)
    again = runner.invoke(app, ["record", "--resume", str(out), "--quiet"])
    assert again.exit_code == 0 and "nothing to resume" in again.output
    assert _hashes(out) == before


def _interrupted_copy(tmp_path):
    out = tmp_path / "r.zarr"
    with pytest.raises(_Crash):
        train(TINY, out, resume_interval=0, on_step=_crash_at(5))
    return out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--lr", "0.5"], 2, "--lr 0.5 differs from the run stored"),
        (["--model", "lenet300"], 2, "--model lenet300 differs"),
        (["--out", "x.zarr"], 2, "drop --out"),
    ],
)
def test_resume_refuses_other_options_and_leaves_the_store(tmp_path, args, code, message):
    out = _interrupted_copy(tmp_path)
    before = _hashes(out)
    result = runner.invoke(app, ["record", "--resume", str(out), "--quiet", *args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _hashes(out) == before


def test_resume_refuses_a_store_from_another_architecture(tmp_path):
    out = _interrupted_copy(tmp_path)
    group = zarr.open_group(str(out / "train"), mode="r+", use_consolidated=False)
    meta = dict(group.attrs["ckpt_tools"])
    meta["config"] = {**meta["config"], "width": 4}  # the stored tables say width 8
    group.attrs["ckpt_tools"] = meta
    before = _hashes(out)
    result = runner.invoke(app, ["record", "--resume", str(out), "--quiet"])
    assert result.exit_code == 1
    assert "recorded from another architecture: parameter 'features.0.weight' has shape" \
        in result.output
    assert _hashes(out) == before


def test_resume_refuses_histories_it_cannot_continue(tmp_path):
    out = tmp_path / "own.zarr"
    model = torch.nn.Linear(3, 2)
    with ckpt_tools.Recorder(out, model, "0:3:1") as rec:
        rec.record(0)
    with pytest.raises(StoreError, match="not recorded by ckpt record"):
        resume_status(out)
    with pytest.raises(StoreError, match="no group 'other' to resume"):
        resume_status(out, "other")
    result = runner.invoke(app, ["record", "--resume", str(tmp_path / "none.zarr")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_interrupted_group_creation_is_recorded_afresh(tiny_run, tmp_path):
    # A kill between the group's first metadata write and its arrays leaves attributes only.
    out = tmp_path / "r.zarr"
    with pytest.raises(_Crash):
        train(TINY, out, on_step=_crash_at(2))
    for entry in (out / "train").iterdir():
        if entry.name != "zarr.json":
            shutil.rmtree(entry)
    status = resume_status(out)
    assert not status.intact and status.stored_steps == 0
    result = runner.invoke(app, ["record", "--resume", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert_same_history(tiny_run, out)


def test_training_interrupted_reports_signal_exit_codes():
    exc = TrainingInterrupted("x", step=3, signum=signal.SIGTERM)
    assert exc.exit_code == 143 and exc.step == 3
    assert isinstance(exc, KeyboardInterrupt)


def test_resume_points_cost_little(tmp_path):
    # Two slots at most: the resume state never grows with the run's length.
    out = tmp_path / "r.zarr"
    cfg = dataclasses.replace(TINY, steps=12, schedule="0:13:1")
    with pytest.raises(_Crash):
        train(cfg, out, resume_interval=0, on_step=_crash_at(11))
    group = zarr.open_group(str(out / "train"), mode="r")
    assert group["resume_params"].shape == (2, group["params"].shape[1])
    ds = ckpt_tools.open_history(out)
    assert not any(name.startswith("resume_") for name in ds.variables)
    assert np.isfinite(ds.params.values).all()
