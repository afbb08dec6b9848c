"""Run the study of Frankle, Schwab & Morcos (2020) end to end with the `ckpt` commands.

Usage:
    python examples/03_reproduce_early_phase.py [OUT_DIR] [--size SIZE] [--device cpu|cuda]
                                                [--data-root DIR] [--dry-run] [--summary-only]

Sizes (``--size``):
    smoke          the embedded digits, a tiny conv net: a few minutes (the default, so
                   the test suite runs the whole pipeline)
    fashion-mnist  ResNet-20 on Fashion-MNIST (Debian's dataset-fashion-mnist): about
                   two hours on 2 CPU cores; the study in docs/reproduction.md
    cifar10        ResNet-20 on CIFAR-10 at the paper's scale (63,000 updates; a GPU and
                   the CIFAR-10 python files under --data-root)
    gpu            ResNet-20 on Fashion-MNIST, 4x the training of fashion-mnist, three IMP
                   levels: about 128,000 updates, sized for under 10 minutes on one large
                   GPU at an estimated 3-4 ms per update (not measured)

Every step is one `ckpt` command (printed before it runs) on one store, OUT_DIR/study.zarr.
Commands skip work that is already stored, so running the script again after an
interruption continues where it stopped. At the end it writes OUT_DIR/report.html and
OUT_DIR/summary.json, the measured value of every claim with its 95% bootstrap interval
over seeds (see docs/reproduction.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {
    "smoke": {
        "record": ["--model", "convnet", "--dataset", "digits", "--width", "8",
                   "--steps", "40", "--batch-size", "64",
                   "--schedule", "0:20:1,20:41:5", "--eval-schedule", "0:41:20"],
        "analyze_eval": "0:41:10",
        "rewinds": (0, 2, 10), "early": 2, "late": 10,
        "levels": 1, "fraction": 0.8, "seeds": "0,1",
        "pretrain_steps": 10, "pretrain_seeds": "0,1",
        "phases": (2, 10),
        "eval_schedule": "40",
    },
    "fashion-mnist": {
        "record": ["--model", "resnet20", "--dataset", "fashion-mnist",
                   "--steps", "500", "--batch-size", "128",
                   "--schedule", "0:100:1,100:300:5,300:501:20",
                   "--eval-schedule", "0:501:100"],
        "analyze_eval": "0:100:10,100:501:50",
        "rewinds": (0, 25, 100), "early": 25, "late": 100,
        "levels": 2, "fraction": 0.75, "seeds": "0,1,2",
        "pretrain_steps": 100, "pretrain_seeds": "0,1",
        "phases": (10, 100),
        "eval_schedule": "500",
    },
    "gpu": {
        "record": ["--model", "resnet20", "--dataset", "fashion-mnist",
                   "--steps", "2000", "--batch-size", "128",
                   "--schedule", "0:200:1,200:1000:5,1000:2001:25",
                   "--eval-schedule", "0:2001:250"],
        "analyze_eval": "0:200:20,200:2001:100",
        "rewinds": (0, 50, 250), "early": 50, "late": 250,
        "levels": 3, "fraction": 0.6, "seeds": "0,1,2",
        "pretrain_steps": 250, "pretrain_seeds": "0,1",
        "phases": (10, 250),
        "eval_schedule": "2000",
    },
    "cifar10": {
        "record": ["--model", "resnet20", "--dataset", "cifar10",
                   "--steps", "63000", "--batch-size", "128",
                   "--schedule", "0:100:1,100:2000:10,2000:63001:500",
                   "--eval-schedule", "0:63001:1000"],
        "analyze_eval": "0:2000:100,2000:63001:1000",
        "rewinds": (0, 500, 2000), "early": 500, "late": 2000,
        "levels": 8, "fraction": 0.2, "seeds": "0,1,2,3",
        "pretrain_steps": 2000, "pretrain_seeds": "0,1,2",
        "phases": (10, 500),
        "eval_schedule": "63000",
    },
}
"""Study sizes. `phases` are the steps that split the early phase into the three windows
compared by the sub-phase claim: (0, a], (a, b] and (b, end]."""

PERMUTATION_RMS = math.sqrt(2.0)
"""Noise scale (in units of the layer's std at k) whose expected change equals that of
permuting the layer's weights: for i.i.d. values, E|w_perm - w|^2 = 2 var per weight."""

ABLATIONS = ("signs_k_mags_init", "signs_k_mags_0", "permute_layer", "noise")
PRETEXT = ("rotation", "blur")


def ckpt_command() -> list[str]:
    """The `ckpt` entry point of the interpreter running this script."""
    exe = shutil.which("ckpt")
    return [exe] if exe else [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]


def commands(out: Path, size: dict, *, device: str, data_root: str | None) -> list[list[str]]:
    """The study as `ckpt` argument lists, in order."""
    store = str(out / "study.zarr")
    common = ["--seeds", size["seeds"], "--eval-schedule", size["eval_schedule"], "--quiet"]
    # the experiments train on the device the recorded run names in its configuration
    record = ["record", *size["record"], "--out", store, "--quiet", "--device", device]
    if data_root:
        record += ["--data-root", data_root]
    steps = [
        record,
        ["analyze", store, "--only", "telemetry", "--quiet"],
        ["analyze", store, "--only", "evaluate", "--eval-steps", size["analyze_eval"],
         "--quiet"],
        ["imp", store, "--levels", str(size["levels"]), "--fraction", str(size["fraction"]),
         "--exclude-output", *sum((["--rewind", str(k)] for k in size["rewinds"]), []),
         *common],
    ]
    for k in (size["early"], size["late"]):
        kinds = sum((["--kind", kind] for kind in ABLATIONS), [])
        steps.append(["ablate", store, "--rewind", str(k), "--level", str(size["levels"]),
                      *kinds, "--alpha", f"{PERMUTATION_RMS:.3f}", *common])
    for task in PRETEXT:
        steps.append(["pretrain", store, "--task", task,
                      "--steps", str(size["pretrain_steps"]), "--levels", str(size["levels"]),
                      "--fraction", str(size["fraction"]), "--exclude-output",
                      "--seeds", size["pretrain_seeds"],
                      "--eval-schedule", size["eval_schedule"], "--quiet"])
    steps.append(["report", store, "-o", str(out / "report.html")])
    return steps


def run(args: list[str], log) -> None:
    line = "ckpt " + shlex.join(args)
    print(f"$ {line}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([*ckpt_command(), *args])
    took = time.perf_counter() - start
    log.write(json.dumps({"command": line, "seconds": round(took, 1),
                          "exit": done.returncode}) + "\n")
    log.flush()
    if done.returncode:
        sys.exit(f"error: `{line}` failed (exit {done.returncode}); fix the cause and run "
                 "this script again: stored work is kept and skipped")


def record_needed(store: Path) -> list[str] | None:
    """Extra `ckpt record` arguments: None to skip it (complete), `--resume` to continue."""
    from ckpt_tools.resume import resume_status

    if not store.exists():
        return []
    status = resume_status(store)
    return None if status.complete else ["--resume", str(store)]


def analysis_stored(store: Path, name: str) -> bool:
    """Whether `ckpt analyze --only NAME` already stored its result for the recorded run."""
    from ckpt_tools.store import list_results

    return any(r.get("analysis") == name for r in list_results(store))


# --- the summary: every claim measured from the store -----------------------------------


def _ci(values) -> dict:
    from ckpt_tools.analyses.stats import mean_ci

    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    ci = mean_ci(values)
    return {"mean": float(ci.mean), "low": float(ci.low), "high": float(ci.high), "n": ci.n,
            "values": [float(v) for v in values]}


def _diff(a, b) -> dict:
    """Mean of a - b with its interval; a and b are paired by seed."""
    from ckpt_tools.analyses.stats import permutation_test

    out = _ci(np.asarray(a, float) - np.asarray(b, float))
    out["pvalue"] = float(permutation_test(np.asarray(a, float), np.asarray(b, float)).pvalue)
    return out


def _recovered(values, rewind_0, rewind_k) -> float | None:
    """(mean(values) - mean(rewind_0)) / (mean(rewind_k) - mean(rewind_0)): the share of
    rewinding's benefit a condition keeps (1: all, 0: none). None where rewinding to k does
    not beat rewinding to 0 beyond the seeds' spread (the gap's 95% interval reaches 0)."""
    gap = _ci(np.asarray(rewind_k, float) - np.asarray(rewind_0, float))
    if not gap["low"] > 0:
        return None
    return float((np.nanmean(values) - np.nanmean(rewind_0)) / gap["mean"])


def _windows(series, steps, edges) -> list[float]:
    means = []
    lo = 0
    for hi in (*edges, int(steps[-1])):
        sel = (steps > lo) & (steps <= hi)
        means.append(float(np.nanmean(series[sel])))
        lo = hi
    return means


def _start_changes(store: Path, conditions, k: int, level: int, seeds) -> dict[str, list]:
    """|w' - m * w_k| / |m * w_k| over the prunable weights at step k, per condition and
    seed: how far an ablation moved the start of the run from plain rewinding (m: the
    run's mask, w': its start, read from the ablated run's stored step k)."""
    from ckpt_tools.analyses.experiments.ablate import ablation_group
    from ckpt_tools.analyses.experiments.pruning import param_table

    import ckpt_tools

    prunable = [spec.name for spec in param_table(store) if spec.prunable]
    rewind = ckpt_tools.load_state_dict(store, k, group="train")
    out: dict[str, list] = {}
    for condition in conditions:
        out[condition] = []
        for seed in seeds:
            group = ablation_group(condition, k, level, seed)
            start = ckpt_tools.load_state_dict(store, k, group=group)
            diff = norm = 0.0
            for name in prunable:
                w_k = rewind[name] * (start[name] != 0)
                diff += float(((start[name] - w_k) ** 2).sum())
                norm += float((w_k**2).sum())
            out[condition].append(math.sqrt(diff / norm))
    return out


def summarize(out: Path, size_name: str, size: dict) -> dict:
    """The measured value of each claim, from the store alone."""
    from ckpt_tools.analyses.experiments.ablate import read_ablation_summary
    from ckpt_tools.analyses.experiments.imp import read_summary
    from ckpt_tools.analyses.experiments.pretrain import read_pretrain_summary

    from ckpt_tools.store import read_result

    store = out / "study.zarr"
    level, early, late = size["levels"], size["early"], size["late"]
    tele = read_result(store, "telemetry").load()
    steps = tele["step"].values
    flips = tele["sign_flips_per_step"].values
    grad = tele["grad_norm"].values
    edges = size["phases"]
    bounds = zip((0, *edges), (*edges, int(steps[-1])), strict=True)
    phases = {
        "windows": [f"({a}, {b}]" for a, b in bounds],
        "sign_flips_per_step": _windows(flips, steps, edges),
        "grad_norm": _windows(grad, steps, edges),
        "grad_norm_peak_step": int(steps[int(np.nanargmax(grad))]),
        "sign_change_fraction_at": {
            str(s): float(tele["sign_change_fraction"].sel(step=s).values)
            for s in (*edges, int(steps[-1]))
        },
    }

    imp = read_summary(store)
    acc = imp["test_accuracy"]
    top = acc.sel(level=level)
    rewinding = {
        "remaining": float(imp["remaining"].sel(level=level).mean()),
        "dense_test_accuracy": float(imp.attrs["dense_test_accuracy"]),
        "accuracy": {str(k): _ci(top.sel(rewind_step=k).values) for k in size["rewinds"]},
        "by_level": {
            str(k): {str(int(n)): _ci(acc.sel(rewind_step=k, level=n).values)
                     for n in imp["level"].values}
            for k in size["rewinds"]
        },
    }
    for k in (early, late):
        rewinding[f"k{k}_minus_k0"] = _diff(top.sel(rewind_step=k).values,
                                            top.sel(rewind_step=0).values)

    abl = read_ablation_summary(store)
    alpha = f"noise_alpha_{round(PERMUTATION_RMS, 3):g}"
    ablations = {}
    for k in (early, late):
        ref = top.sel(rewind_step=k).values
        zero = top.sel(rewind_step=0).values
        row = {"rewind_k": _ci(ref), "rewind_0": _ci(zero)}
        for kind in abl["kind"].values:
            vals = abl["test_accuracy"].sel(kind=kind, rewind_step=k, level=level).values
            name = str(kind)
            row[name] = _ci(vals)
            row[f"{name}_minus_rewind_k"] = _diff(vals, ref)
            row[f"{name}_recovered"] = _recovered(vals, zero, ref)
        if alpha in row and "permute_layer" in row:
            row["noise_minus_permute_layer"] = _diff(row[alpha]["values"],
                                                     row["permute_layer"]["values"])
        changes = _start_changes(store, [str(c) for c in abl["kind"].values], k, level,
                                 [int(seed) for seed in abl["seed"].values])
        row["start_change"] = {kind: _ci(values) for kind, values in changes.items()}
        ablations[str(k)] = row
    ablations["noise_condition"] = alpha

    pre = read_pretrain_summary(store)
    n = size["pretrain_steps"]
    pseeds = [int(s) for s in size["pretrain_seeds"].split(",")]
    same = n if n in size["rewinds"] else early  # labelled updates of the recorded run
    pretraining = {"steps": n, "seeds": pseeds, "compared_rewind": same}
    ref0 = top.sel(rewind_step=0, seed=pseeds).values
    refk = top.sel(rewind_step=same, seed=pseeds).values
    for task in pre["task"].values:
        vals = pre["test_accuracy"].sel(task=task, pretrain_steps=n, level=level,
                                        seed=pseeds).values
        pretraining[str(task)] = {
            "accuracy": _ci(vals),
            "minus_rewind_0": _diff(vals, ref0),
            "minus_rewind_k": _diff(vals, refk),
            "recovered": _recovered(vals, ref0, refk),
            "pretext_accuracy": _ci(pre["pretext_accuracy"].sel(
                task=task, pretrain_steps=n, seed=pseeds).values),
        }
    pretraining["rewind_0"] = _ci(ref0)
    pretraining["rewind_k"] = _ci(refk)
    return {"size": size_name, "store": str(store), "sub_phases": phases,
            "rewinding": rewinding, "ablations": ablations, "pretraining": pretraining}


def _fmt(ci: dict, pct: bool = True) -> str:
    scale, unit = (100, " pp") if pct else (1, "")
    return (f"{ci['mean'] * scale:+.2f}{unit} [{ci['low'] * scale:+.2f}, "
            f"{ci['high'] * scale:+.2f}]")


def _acc(ci: dict) -> str:
    return f"{ci['mean']:.2%} [{ci['low']:.2%}, {ci['high']:.2%}]"


def _frac(value: float | None) -> str:
    return "n/a (no gap to recover)" if value is None else f"{value:.2f}"


def _change(ci: dict) -> str:
    return f"{ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]"


def render(summary: dict) -> str:
    """The measured side of each claim as Markdown: means with 95% bootstrap intervals over
    seeds (accuracy differences in percentage points, p from an exact permutation test)."""
    ph, rw, ab, pre = (summary[k] for k in ("sub_phases", "rewinding", "ablations",
                                            "pretraining"))
    ks = sorted(int(k) for k in rw["accuracy"])
    early, late = ks[1], ks[-1]
    lines = ["| claim | measured |", "|---|---|"]
    flips = ", ".join(f"{w}: {v:.2e}" for w, v in zip(ph["windows"], ph["sign_flips_per_step"],
                                                       strict=True))
    grads = ", ".join(f"{w}: {v:.3g}" for w, v in zip(ph["windows"], ph["grad_norm"],
                                                       strict=True))
    lines.append(f"| sub-phases: sign flips per update | {flips} |")
    lines.append(f"| sub-phases: gradient norm | {grads}; peak at step "
                 f"{ph['grad_norm_peak_step']} |")
    accs = "; ".join(f"k={k}: {_acc(rw['accuracy'][str(k)])}" for k in ks)
    lines.append(f"| IMP at {rw['remaining']:.2%} of weights (dense "
                 f"{rw['dense_test_accuracy']:.2%}) | {accs} |")
    for k in (early, late):
        d = rw[f"k{k}_minus_k0"]
        lines.append(f"| rewind to {k} minus rewind to 0 | {_fmt(d)}, p = {d['pvalue']:.2f} |")
    for k in (early, late):
        row = ab[str(k)]
        for kind in [c for c in row if c + "_minus_rewind_k" in row]:
            d = row[f"{kind}_minus_rewind_k"]
            lines.append(
                f"| {kind} at k={k} minus rewinding to {k} | {_fmt(d)}, p = {d['pvalue']:.2f}; "
                f"recovered {_frac(row[f'{kind}_recovered'])}; start moved "
                f"{_change(row['start_change'][kind])} of w_k |")
    for k in (early, late):
        if "noise_minus_permute_layer" in ab[str(k)]:
            d = ab[str(k)]["noise_minus_permute_layer"]
            lines.append(f"| {ab['noise_condition']} minus permute_layer at k={k} | {_fmt(d)}, "
                         f"p = {d['pvalue']:.2f} |")
    n, same = pre["steps"], pre["compared_rewind"]
    for task in [t for t in pre if isinstance(pre[t], dict) and "recovered" in pre[t]]:
        t = pre[task]
        lines.append(
            f"| pre-training {task}, {n} updates | {_acc(t['accuracy'])}; minus rewind to 0: "
            f"{_fmt(t['minus_rewind_0'])}; minus rewind to {same}: {_fmt(t['minus_rewind_k'])}"
            f"; recovered {_frac(t['recovered'])}; pretext accuracy "
            f"{_acc(t['pretext_accuracy'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=None,
                        help="output folder (default: a temporary one)")
    parser.add_argument("--size", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--data-root", default=None, help="folder holding CIFAR-10")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--summary-only", action="store_true",
                        help="only recompute summary.json from the stored results")
    opts = parser.parse_args()
    out = opts.out or Path(tempfile.mkdtemp())
    size = SIZES[opts.size]
    steps = commands(out, size, device=opts.device, data_root=opts.data_root)
    if opts.dry_run:
        for args in steps:
            print("ckpt " + shlex.join(args))
        return
    if not opts.summary_only:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "commands.jsonl", "a") as log:
            for args in steps:
                if args[0] == "record":
                    extra = record_needed(out / "study.zarr")
                    if extra is None:
                        print("recorded run is complete; skipping ckpt record", flush=True)
                        continue
                    if extra:
                        args = ["record", *extra, "--quiet"]
                elif args[0] == "analyze" and analysis_stored(out / "study.zarr", args[3]):
                    print(f"analysis {args[3]!r} is stored; skipping ckpt analyze", flush=True)
                    continue
                run(args, log)
    from ckpt_tools.store import StoreError

    try:
        summary = summarize(out, opts.size, size)
    except (StoreError, KeyError) as exc:
        sys.exit(f"error: cannot summarise {out / 'study.zarr'} at size {opts.size!r}: {exc}; "
                 "run the study there first (without --summary-only), at the same --size")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(render(summary))
    print(render(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and {out / 'report.html'}")


if __name__ == "__main__":
    main()
