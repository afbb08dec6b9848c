"""The study of Frankle, Schwab & Morcos (2020), end to end, as a sequence of `ckpt` commands.

`run_study(out, size)` runs every step as one ``ckpt`` command (printed before it runs,
logged to ``OUT/commands.jsonl``) on one store, ``OUT/study.zarr``. Commands skip work
that is already stored, so running it again after an interruption continues where it
stopped. At the end it writes ``OUT/report.html`` and ``OUT/summary.json`` and
``OUT/summary.md``: the measured value of every claim with its 95% Student t interval
over seeds (`ckpt_tools.analyses.experiments.study_summary`; ``docs/reproduction.md``).
``ckpt study OUT --size SIZE`` calls it.

Sizes (`SIZES`):

- ``smoke``: the embedded digits, a tiny conv net, a few minutes (the test suite runs it);
- ``fashion-mnist``: ResNet-20 on Fashion-MNIST (Debian's dataset-fashion-mnist), about
  two hours on 2 CPU cores; the study in docs/reproduction.md;
- ``cifar10``: ResNet-20 on CIFAR-10 at the paper's scale (63,000 updates; a GPU and the
  CIFAR-10 python files under ``data_root``);
- ``gpu``: ResNet-20 on Fashion-MNIST, 4x the training of fashion-mnist, three IMP
  levels: about 128,000 updates, sized for under 10 minutes on one large GPU at an
  estimated 3-4 ms per update (not measured).
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ckpt_tools.store import StoreError

__all__ = ["ABLATIONS", "PERMUTATION_RMS", "PRETEXT", "SIZES", "commands", "run_study"]

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



def _ckpt() -> list[str]:
    # the `ckpt` of this interpreter (a `ckpt` on PATH may belong to another install)
    return [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]


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



def _run(args: list[str], log, echo: Callable[[str], None]) -> None:
    line = "ckpt " + shlex.join(args)
    echo(f"$ {line}")
    start = time.perf_counter()
    done = subprocess.run([*_ckpt(), *args])
    took = time.perf_counter() - start
    log.write(json.dumps({"command": line, "seconds": round(took, 1),
                          "exit": done.returncode}) + "\n")
    log.flush()
    if done.returncode:
        raise RuntimeError(f"`{line}` failed (exit {done.returncode}); fix the cause and run "
                           "the study again: stored work is kept and skipped")


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


def run_study(
    out: str | Path,
    size: str = "smoke",
    *,
    device: str = "cpu",
    data_root: str | None = None,
    dry_run: bool = False,
    summary_only: bool = False,
    echo: Callable[[str], None] = print,
) -> dict | None:
    """Run (or continue) the study in the folder `out`, then summarise it.

    Args:
        out: The study's folder (created; the store is ``out/study.zarr``).
        size: A key of `SIZES`.
        device: Where the recorded run trains (the experiments follow it).
        data_root: Folder holding the dataset files (CIFAR-10).
        dry_run: Only `echo` the commands.
        summary_only: Only summarise the stored results again.
        echo: Prints a line of progress (the commands, the summary).

    Returns:
        The summary (`study_summary.summarize`), or None for a dry run.

    Raises:
        ValueError: unknown size.
        RuntimeError: a command failed (stored work is kept).
        StoreError: nothing to summarise (run the study first, at the same size).
    """
    from ckpt_tools.analyses.experiments.study_summary import render, summarize

    if size not in SIZES:
        raise ValueError(f"unknown study size {size!r}; known: {', '.join(SIZES)}")
    out, spec = Path(out), SIZES[size]
    steps = commands(out, spec, device=device, data_root=data_root)
    if dry_run:
        for args in steps:
            echo("ckpt " + shlex.join(args))
        return None
    store = out / "study.zarr"
    if not summary_only:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "commands.jsonl", "a") as log:
            for args in steps:
                if args[0] == "record":
                    extra = record_needed(store)
                    if extra is None:
                        echo("recorded run is complete; skipping ckpt record")
                        continue
                    if extra:
                        args = ["record", *extra, "--quiet"]
                elif args[0] == "analyze" and analysis_stored(store, args[3]):
                    echo(f"analysis {args[3]!r} is stored; skipping ckpt analyze")
                    continue
                _run(args, log, echo)
    try:
        summary = summarize(store, size, spec)
    except (StoreError, KeyError) as exc:
        raise StoreError(
            f"cannot summarise {store} at size {size!r}: {exc}",
            hint="run the study there first (without --summary-only), at the same --size",
        ) from None
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(render(summary))
    echo(render(summary))
    echo(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and {out / 'report.html'}")
    return summary
