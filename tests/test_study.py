"""The reproduction study (`ckpt study`, examples/03) end to end at its smoke size.

The study runs every `ckpt` command on the tiny digits run and summarises each claim from
the store. The tests recompute the summary's numbers by another route: the stored arrays
read with xarray straight from the Zarr groups, and means, intervals and tests computed
with numpy and scipy.stats.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from ckpt_tools.analyses.experiments import instability
from ckpt_tools.analyses.experiments.study import SIZES, commands

CKPT = [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]
EXAMPLE = Path(__file__).parents[1] / "examples" / "03_reproduce_early_phase.py"
SMOKE = SIZES["smoke"]
FINAL = int(SMOKE["eval_schedule"])
SEEDS = [int(s) for s in SMOKE["seeds"].split(",")]
LATE = SMOKE["rewinds"][-1]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    # the example calls the library function `ckpt study` calls, at the smoke size
    run = subprocess.run([sys.executable, str(EXAMPLE), str(out), "smoke"],
                         capture_output=True, text=True, timeout=900, cwd=out)
    assert run.returncode == 0, f"study failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return out, json.loads((out / "summary.json").read_text()), run.stdout


def _open(out: Path, group: str) -> xr.Dataset:
    return xr.open_zarr(out / "study.zarr", group=group, consolidated=False)


def _final_accuracy(out: Path, group: str) -> float:
    return float(_open(out, group)["test_accuracy"].sel(eval_step=FINAL))


def _claim(summary: dict, name: str) -> dict:
    (found,) = [c for c in summary["claims"] if c["claim"] == name]
    return found


def _exact_sign_flip(d: np.ndarray) -> float:
    """Two-sided p of the mean of `d` against all 2**n sign flips (by enumeration)."""
    means = [np.mean(np.array(signs) * d) for signs in itertools.product((1, -1), repeat=d.size)]
    return float(np.mean(np.abs(means) >= abs(d.mean()) - 1e-12))


def _check_paired(claim: dict, a: np.ndarray, b: np.ndarray) -> None:
    d = a - b
    low, high = stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=stats.sem(d))
    assert claim["n"] == d.size
    assert claim["effect"] == pytest.approx(d.mean(), abs=1e-12)
    assert [claim["low"], claim["high"]] == pytest.approx([low, high], abs=1e-9)
    assert claim["t_pvalue"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-6)
    assert claim["pvalue"] == pytest.approx(_exact_sign_flip(d))
    assert claim["interval"] == "Student t 95%"
    inside = low <= 0 <= high
    assert ("no difference detected" in claim["verdict"]) == inside


def test_the_commands_ran_in_order_with_the_sizes_argument_lists(study):
    out, summary, stdout = study
    log = [json.loads(line) for line in (out / "commands.jsonl").read_text().splitlines()]
    expected = ["ckpt " + " ".join(args) for args in commands(out, SMOKE, device="cpu",
                                                                  data_root=None)]
    assert [entry["command"] for entry in log] == expected
    assert [line.split()[1] for line in expected] == [
        "record", "instability", "analyze", "analyze", "imp", "ablate", "instability", "report"]
    assert all(entry["exit"] == 0 for entry in log)
    assert all(f"$ {entry['command']}" in stdout for entry in log)
    assert summary["pilot"]["threshold"] == 0.0 and summary["pilot"]["passed"]
    assert "random_reinit" in (out / "report.html").read_text()


def test_retraining_inherits_the_recorded_runs_augmentation_and_resolution(study):
    out, _, _ = study
    groups = [f"experiments/imp/rewind_{LATE}/seed_{SEEDS[-1]}/level_1",
              f"experiments/ablate/random_reinit/rewind_0/level_1/seed_{SEEDS[0]}",
              f"experiments/instability/rewind_{LATE}/seed_2"]
    for group in ["train", *groups]:
        config = _open(out, group).attrs["ckpt_tools"]["config"]
        assert (config["augment"], config["resolution"]) == (True, 6), group


def test_rewinding_claims_recomputed_from_the_stored_runs(study):
    out, summary, _ = study
    acc = {k: np.array([_final_accuracy(out, f"experiments/imp/rewind_{k}/seed_{s}/level_1")
                        for s in SEEDS]) for k in SMOKE["rewinds"]}
    reinit = np.array([_final_accuracy(
        out, f"experiments/ablate/random_reinit/rewind_0/level_1/seed_{s}") for s in SEEDS])
    dense = _final_accuracy(out, "train")
    assert summary["dense"]["test_accuracy"] == pytest.approx(dense)
    for k, values in acc.items():
        ci = summary["accuracy"][f"k={k}"]
        low, high = stats.t.interval(0.95, len(SEEDS) - 1, loc=values.mean(),
                                     scale=stats.sem(values))
        assert (ci["mean"], ci["low"], ci["high"], ci["n"]) == pytest.approx(
            (values.mean(), low, high, len(SEEDS)))
    _check_paired(_claim(summary, f"IMP rewound to k={LATE} minus k=0"), acc[LATE], acc[0])
    _check_paired(_claim(summary, "IMP k=0 minus random re-init, level 1"), acc[0], reinit)
    for k in (LATE, 0):
        claim = _claim(summary, f"IMP k={k} minus dense")
        _check_paired(claim, acc[k], np.full(len(SEEDS), dense))
        assert claim["t_pvalue"] == pytest.approx(stats.ttest_1samp(acc[k], dense).pvalue)
        assert "one sample against the dense run" in claim["method"]


def test_remaining_share_is_the_stored_masks_true_fraction(study):
    out, summary, _ = study
    train = _open(out, "train")
    prunable = np.zeros(train.sizes["param"], bool)
    for offset, size, keep in zip(train.layer_offset.values, train.layer_size.values,
                                  train.layer_prunable.values, strict=True):
        prunable[offset:offset + size] = keep
    mask = _open(out, "experiments/imp/rewind_0/seed_0/masks")["mask"].values[1]
    assert summary["remaining"]["1"] == pytest.approx(mask[prunable].mean())
    assert summary["remaining"]["1"] == pytest.approx(0.2, abs=0.001)  # output layer pruned too


def test_instability_barriers_recomputed_from_the_stored_paths(study):
    out, summary, _ = study
    stored = _open(out, "analyses/instability_summary")
    for k in SMOKE["rewinds"]:
        error = stored["test_error"].sel(rewind_step=k).values  # (pair, alpha)
        barrier = error.max(axis=1) - (error[:, 0] + error[:, -1]) / 2
        ci = summary["instability"]["by_rewind"][str(k)]
        assert ci["values"] == pytest.approx(list(barrier))
        # one pair of copies: a single measurement, reported without an interval
        assert ci["n"] == 1 and ci["low"] is None and "measured once" in ci["verdict"]
    assert summary["pilot"]["barrier"] == pytest.approx(
        summary["instability"]["by_rewind"]["0"]["mean"])


def test_sign_changes_recomputed_from_the_stored_weights(study):
    out, summary, _ = study
    train = _open(out, "train")
    weights = np.concatenate([np.arange(o, o + n) for o, n, keep in zip(
        train.layer_offset.values, train.layer_size.values, train.layer_prunable.values,
        strict=True) if keep])
    params = train["params"].values[:, weights]
    steps = train["step"].values
    signs = summary["sign_changes"]
    for step, value in signs["fraction_vs_init"].items():
        row = params[list(steps).index(int(step))]
        assert value == pytest.approx(np.mean(row * params[0] < 0))
    assert set(signs["fraction_vs_init"]) == {"5", "10", "30"}
    # windows of equal spacing only: every update up to 10, then every 5 (the schedule)
    assert [(w["window"], w["gap"]) for w in signs["flip_rate_windows"]] == [
        ("(0, 10]", 1), ("(10, 30]", 5)]
    for w, (lo, hi) in zip(signs["flip_rate_windows"], ((0, 10), (10, 30)), strict=True):
        rows = [i for i, s in enumerate(steps) if lo < s <= hi]
        rates = [np.mean(params[i] * params[i - 1] < 0) / (steps[i] - steps[i - 1])
                 for i in rows]
        assert w["records"] == len(rows) and w["rate"] == pytest.approx(np.mean(rates))


def test_stored_instability_paths_are_not_measured_again(study, tmp_path, monkeypatch):
    out, _, _ = study
    store = tmp_path / "study.zarr"
    shutil.copytree(out / "study.zarr", store)
    before = _open(out, "analyses/instability_summary")["test_error"].sel(rewind_step=0)

    def measured(*args, **kwargs):
        raise AssertionError("a stored path was measured again")

    monkeypatch.setattr(instability, "path_metrics", measured)
    settings = instability.InstabilitySettings(rewind_steps=(0,), seeds=(1, 2),
                                               eval_schedule=str(FINAL))
    result = instability.run_instability(store, settings)
    np.testing.assert_array_equal(result["test_error"].sel(rewind_step=0), before)
    assert list(result.rewind_step.values) == list(SMOKE["rewinds"])


def test_the_pilot_stops_a_stable_regime_before_imp(study, tmp_path):
    out, summary, _ = study
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    (copy / "summary.json").unlink()
    logged = len((copy / "commands.jsonl").read_text().splitlines())
    barrier = summary["pilot"]["barrier"]
    run = subprocess.run([*CKPT, "study", str(copy), "--size", "smoke",
                          "--pilot-threshold", f"{barrier + 0.001:.6f}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("error: pilot: the error barrier at k = 0 is "
                                 f"{barrier * 100:.2f} pp")
    assert "raise the learning rate" in run.stderr and len(run.stderr.splitlines()) == 1
    log = [json.loads(line) for line in (copy / "commands.jsonl").read_text().splitlines()]
    assert [entry["command"].split()[1] for entry in log[logged:]] == ["instability"]
    assert not (copy / "summary.json").exists()


def test_fashion_mnist_dry_run_is_the_documented_command_list(tmp_path):
    run = subprocess.run([*CKPT, "study", str(tmp_path / "fm"), "--size", "fashion-mnist",
                          "--dry-run"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    store = tmp_path / "fm" / "study.zarr"
    common = "--eval-schedule 2814 --quiet"
    assert run.stdout.splitlines() == [
        "ckpt record --model resnet20 --dataset fashion-mnist --augment --resolution 14 "
        "--steps 2814 --batch-size 128 --lr 0.1 --schedule 0:100:1,100:500:5,500:2815:50 "
        f"--eval-schedule 0:2815:469 --out {store} --quiet --device cpu",
        f"ckpt instability {store} --rewind 0 --seeds 1,2 {common}",
        f"ckpt analyze {store} --only telemetry --quiet",
        f"ckpt analyze {store} --only evaluate --eval-steps 0:100:20,100:500:100,500:2815:469 "
        "--quiet",
        f"ckpt imp {store} --levels 1 --fraction 0.8 --include-output --rewind 0 --rewind 300 "
        f"--seeds 0,1,2,3,4 {common}",
        f"ckpt ablate {store} --rewind 0 --level 1 --kind random_reinit --seeds 0,1,2,3,4 "
        f"{common}",
        f"ckpt instability {store} --rewind 0 --rewind 300 --seeds 1,2 {common}",
        f"ckpt report {store} -o {tmp_path / 'fm' / 'report.html'}",
    ]
    assert not (tmp_path / "fm").exists()


def test_gpu_sizes_reinit_every_level_and_measure_instability_at_the_rewinds(tmp_path):
    for name in ("gpu", "cifar10"):
        size = SIZES[name]
        lines = [" ".join(a) for a in commands(tmp_path, size, device="cuda", data_root=None)]
        assert "--device cuda" in lines[0]
        assert not any("--device" in line for line in lines[1:])  # experiments follow the run
        reinit = [line for line in lines if "--kind random_reinit" in line]
        assert [line.split("--level ")[1].split()[0] for line in reinit] == [
            str(n) for n in range(1, size["levels"] + 1)]
        rewinds = " ".join(f"--rewind {k}" for k in size["rewinds"])
        assert lines[1].startswith("instability") and "--rewind 0 --seeds" in lines[1]
        assert lines[-2].startswith(f"instability {tmp_path / 'study.zarr'} {rewinds} ")


def test_the_reproduction_page_shows_the_committed_summary():
    """docs/reproduction.md shows what the study renders from the committed summary, or,
    until the Fashion-MNIST study's summary is committed, says its numbers are pending."""
    from ckpt_tools.analyses.experiments import study_summary as study

    docs = Path(__file__).parents[1] / "docs"
    page = (docs / "reproduction.md").read_text()
    committed = docs / "reproduction" / "fashion-mnist-summary.json"
    if not committed.exists():
        assert "RESULTS PENDING" in page
        return
    table = study.render(json.loads(committed.read_text())).splitlines()
    missing = [line for line in table if line not in page.splitlines()]
    assert not missing, missing
    assert "RESULTS PENDING" not in page


def test_summary_only_without_a_study_says_so_in_one_line(tmp_path):
    run = subprocess.run([*CKPT, "study", str(tmp_path / "none"), "--summary-only"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.startswith("error: cannot summarise") and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "none").exists()


def test_the_pilot_times_updates_and_counts_what_the_study_trains(study):
    out, summary, stdout = study
    timing = summary["pilot"]["timing"]
    assert json.loads((out / "pilot-timing.json").read_text()) == timing
    assert timing["updates"] == 50 and "pilot: 50 updates took" in stdout
    assert timing["seconds_per_update"] == pytest.approx(timing["seconds"] / 50, abs=1e-5)
    # every update the study trained, counted from the stored histories' first and last steps
    trained = 0
    for group in _trained_groups(out / "study.zarr"):
        history = _open(out, group)  # rows from step 0, then from where training started
        start = history.attrs["ckpt_tools"]["config"]["start_step"]
        trained += int(history["step"].values[-1]) - start
    assert timing["planned_updates"] == trained
    assert timing["projected_training_hours"] == pytest.approx(
        trained * timing["seconds_per_update"] / 3600)


def _trained_groups(store: Path) -> list[str]:
    """Groups holding a trained history (a `params` array), the dense run included."""
    return sorted(str(p.parent.parent.relative_to(store)) for p in store.rglob("params/zarr.json"))
