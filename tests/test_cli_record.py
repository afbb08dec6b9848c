"""`ckpt record` and `ckpt info` through typer's CliRunner."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools.cli.app import app

runner = CliRunner()
SMALL = ["--model", "convnet", "--width", "4", "--steps", "12", "--batch-size", "32",
         "--schedule", "0:13:1", "--eval-schedule", "0:13:6", "--quiet"]


def _hashes(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_record_then_info(tmp_path):
    out = tmp_path / "run.zarr"
    result = runner.invoke(app, ["record", *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "recorded" in result.output and "test accuracy" in result.output
    assert ckpt_tools.open_history(out).step.values.tolist() == list(range(13))
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    for word in ("train", "13", "convnet", "stored/raw ="):
        assert word in info.output
    summary = json.loads(runner.invoke(app, ["info", str(out), "--json"]).output)
    assert summary["groups"][0]["steps"] == 13


def test_default_out_is_descriptive_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["record", *SMALL])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "convnet-digits-s0-12.zarr" / "zarr.json").is_file()


def test_existing_store_is_refused_and_untouched(tmp_path):
    out = tmp_path / "run.zarr"
    assert runner.invoke(app, ["record", *SMALL, "--out", str(out)]).exit_code == 0
    before = _hashes(out)
    again = runner.invoke(app, ["record", *SMALL, "--out", str(out), "--seed", "3"])
    assert again.exit_code == 1
    assert "already exists" in again.output and "--overwrite" in again.output
    assert len(again.output.strip().splitlines()) == 1
    assert _hashes(out) == before
    replaced = runner.invoke(app, ["record", *SMALL, "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "0:10:0"], "invalid schedule part '0:10:0'"),
        (["--model", "resnet21"], "resnet21"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--steps", "0"], "steps must be at least 1"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, args, message):
    result = runner.invoke(app, ["record", *SMALL, "--out", str(tmp_path / "x.zarr"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_info_on_a_missing_store(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 1
    assert "does not exist" in result.output
