"""The reproduction study (`ckpt study`, examples/03) end to end at its smoke size.

The study runs every `ckpt` command on the tiny digits run, then summarises each claim
from the store; the tests check the summary against the stored results.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckpt_tools.analyses.experiments.ablate import read_ablation_summary
from ckpt_tools.analyses.experiments.imp import read_summary
from ckpt_tools.analyses.experiments.pretrain import read_pretrain_summary
from ckpt_tools.store import read_result

CKPT = [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]
EXAMPLE = Path(__file__).parents[1] / "examples" / "03_reproduce_early_phase.py"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    # the example calls the library function `ckpt study` calls, at the smoke size
    run = subprocess.run([sys.executable, str(EXAMPLE), str(out), "smoke"],
                         capture_output=True, text=True, timeout=900, cwd=out)
    assert run.returncode == 0, f"study failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return out, json.loads((out / "summary.json").read_text()), run.stdout


def test_every_command_ran_and_the_report_exists(study):
    out, _, stdout = study
    log = [json.loads(line) for line in (out / "commands.jsonl").read_text().splitlines()]
    kinds = [entry["command"].split()[1] for entry in log]
    assert kinds == ["record", "analyze", "analyze", "imp", "ablate", "ablate", "pretrain",
                     "pretrain", "report"]
    assert all(entry["exit"] == 0 for entry in log)
    assert all(f"$ {entry['command']}" in stdout for entry in log)
    assert (out / "report.html").stat().st_size > 10_000


def test_rewinding_numbers_are_the_stored_imp_results(study):
    out, summary, _ = study
    imp = read_summary(out / "study.zarr")
    level = int(imp["level"].max())
    for k, ci in summary["rewinding"]["accuracy"].items():
        values = imp["test_accuracy"].sel(rewind_step=int(k), level=level).values
        assert ci["values"] == pytest.approx(list(values))
        assert ci["mean"] == pytest.approx(np.mean(values))
        assert ci["low"] <= ci["mean"] <= ci["high"]
    diff = summary["rewinding"]["k10_minus_k0"]
    acc = imp["test_accuracy"].sel(level=level)
    assert diff["mean"] == pytest.approx(float((acc.sel(rewind_step=10) - acc.sel(rewind_step=0))
                                               .mean()))
    assert 0 <= diff["pvalue"] <= 1


def test_ablation_numbers_are_the_stored_ablations(study):
    out, summary, _ = study
    abl = read_ablation_summary(out / "study.zarr")
    imp = read_summary(out / "study.zarr")
    for k in (2, 10):
        row = summary["ablations"][str(k)]
        ref = imp["test_accuracy"].sel(rewind_step=k, level=1).values
        for kind in ("signs_k_mags_init", "signs_k_mags_0", "permute_layer", "noise_alpha_1.414"):
            values = abl["test_accuracy"].sel(kind=kind, rewind_step=k, level=1).values
            assert row[kind]["values"] == pytest.approx(list(values))
            assert row[f"{kind}_minus_rewind_k"]["mean"] == pytest.approx(np.mean(values - ref))
        # the noise is scaled to the permutation's expected change, sqrt(2) layer stds
        change = row["start_change"]
        assert change["noise_alpha_1.414"]["mean"] == pytest.approx(math.sqrt(2), rel=0.2)
        assert change["permute_layer"]["mean"] == pytest.approx(math.sqrt(2), rel=0.35)
        assert change["signs_k_mags_0"]["mean"] < change["signs_k_mags_init"]["mean"]


def test_pretraining_numbers_are_the_stored_runs(study):
    out, summary, _ = study
    pre = read_pretrain_summary(out / "study.zarr")
    for task in ("rotation", "blur_x4"):
        values = pre["test_accuracy"].sel(task=task, pretrain_steps=10, level=1).values
        assert summary["pretraining"][task]["accuracy"]["values"] == pytest.approx(list(values))


def test_sub_phase_windows_average_the_stored_telemetry(study):
    out, summary, _ = study
    tele = read_result(out / "study.zarr", "telemetry")
    phases = summary["sub_phases"]
    assert phases["windows"] == ["(0, 2]", "(2, 10]", "(10, 40]"]
    for name in ("sign_flips_per_step", "grad_norm"):
        series = tele[name]
        expected = [float(series.sel(step=slice(a + 1, b)).mean())
                    for a, b in ((0, 2), (2, 10), (10, 40))]
        assert phases[name] == pytest.approx(expected)
    grad = tele["grad_norm"]
    assert phases["grad_norm_peak_step"] == int(grad["step"][int(np.nanargmax(grad.values))])


def test_dry_run_prints_the_commands_without_running_them(tmp_path):
    run = subprocess.run([*CKPT, "study", str(tmp_path / "x"), "--size",
                          "cifar10", "--device", "cuda", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 9 and all(line.startswith("ckpt ") for line in lines)
    assert "--dataset cifar10" in lines[0] and "--device cuda" in lines[0]
    assert not any("--device" in line for line in lines[1:])  # experiments follow the run
    assert not (tmp_path / "x").exists()


def test_the_reproduction_page_shows_the_committed_summary():
    """docs/reproduction.md's measured table is what the study renders from the committed
    summary of the Fashion-MNIST study."""
    from ckpt_tools.analyses.experiments import study_summary as study

    docs = Path(__file__).parents[1] / "docs"
    summary = json.loads((docs / "reproduction" / "fashion-mnist-summary.json").read_text())
    page = (docs / "reproduction.md").read_text()
    table = study.render(summary).splitlines()
    assert len(table) > 10
    missing = [line for line in table if line not in page.splitlines()]
    assert not missing, missing


def test_summary_only_without_a_study_says_so_in_one_line(tmp_path):
    run = subprocess.run([*CKPT, "study", str(tmp_path / "none"), "--summary-only"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.startswith("error: cannot summarise") and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "none").exists()
