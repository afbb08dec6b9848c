"""The study of Frankle, Schwab & Morcos (2020), end to end, as a sequence of `ckpt` commands.

`run_study(out, size)` runs every step as one ``ckpt`` command (printed before it runs,
logged to ``OUT/commands.jsonl``) on one store, ``OUT/study.zarr``. First, the pilot
times 50 training updates of the size's run (`time_updates`; ``OUT/pilot-timing.json``, in
the summary) and prints the study's projected training time. Then:

1. ``ckpt record``: the dense run;
2. the pilot, ``ckpt instability --rewind 0``: the error barrier between two copies
   trained from the initialisation with different data orders. Below the size's
   threshold (1 percentage point of test error) the regime is stable to SGD noise from
   the start, so rewinding to 0 will match dense and IMP cannot show the paper's effect;
   the study stops there (`StableRegime`) instead of spending its budget;
3. ``ckpt analyze``: telemetry and the accuracy curve;
4. ``ckpt imp``: few-level IMP (one-shot at most sizes) with one mask lineage per seed,
   the output layer pruned, rewinding to 0 and to a later step;
5. ``ckpt ablate --kind random_reinit`` at every pruned level: the sub-network from a
   fresh random initialisation;
6. optional ablations and pre-training (sizes that list them);
7. ``ckpt instability`` at 0 (stored by the pilot) and at the rewind points;
8. ``ckpt report``.

Commands skip work that is already stored, so running it again after an interruption
continues where it stopped. At the end it writes ``OUT/summary.json`` and
``OUT/summary.md`` (`ckpt_tools.analyses.experiments.study_summary`; every claim with
its paired effect, 95% interval, method, p value and n). ``ckpt study OUT --size SIZE``
calls it.

Sizes (`SIZES`):

- ``smoke``: the embedded digits, a tiny conv net, well under a minute of training (the
  test suite runs it; its pilot is measured and reported but not gated: threshold 0);
- ``fashion-mnist``: ResNet-20 on Fashion-MNIST at 14x14 with augmentation, 6 epochs
  (2,814 updates), about two hours on 2 CPU cores; the study in docs/reproduction.md;
- ``gpu``: the same at 28x28 for 10 epochs (4,690 updates), two IMP levels, ablations
  and pre-training; sized for one GPU (not measured);
- ``cifar10``: ResNet-20 on CIFAR-10 at the paper's scale (63,000 updates; a GPU and the
  CIFAR-10 python files under ``data_root``).
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

__all__ = [
    "ABLATIONS", "PERMUTATION_RMS", "PRETEXT", "SIZES", "StableRegime", "commands",
    "pilot_barrier", "planned_updates", "run_study", "time_updates",
]

SIZES = {
    "smoke": {
        "record": ["--model", "convnet", "--dataset", "digits", "--width", "8", "--augment",
                   "--resolution", "6", "--steps", "30", "--batch-size", "64",
                   "--schedule", "0:10:1,10:31:5", "--eval-schedule", "0:31:10"],
        "analyze_eval": "0:10:5,10:31:10",
        "pilot_threshold": 0.0,
        "rewinds": (0, 5), "levels": 1, "fraction": 0.8, "seeds": "0,1,2",
        "instability_seeds": "1,2",
        "eval_schedule": "30",
        "in_process": True,
    },
    "fashion-mnist": {
        # 6 epochs of 469 updates; lr 0.1 without warm-up, x0.1 at 50% and 75%
        "record": ["--model", "resnet20", "--dataset", "fashion-mnist", "--augment",
                   "--resolution", "14", "--steps", "2814", "--batch-size", "128",
                   "--lr", "0.1", "--schedule", "0:100:1,100:500:5,500:2815:50",
                   "--eval-schedule", "0:2815:469"],
        "analyze_eval": "0:100:20,100:500:100,500:2815:469",
        "pilot_threshold": 0.01,
        "rewinds": (0, 300), "levels": 1, "fraction": 0.8, "seeds": "0,1,2,3,4",
        "instability_seeds": "1,2",
        "eval_schedule": "2814",
    },
    "gpu": {
        # 10 epochs at 28x28; two levels of 60% leave 16% of the weights
        "record": ["--model", "resnet20", "--dataset", "fashion-mnist", "--augment",
                   "--steps", "4690", "--batch-size", "128", "--lr", "0.1",
                   "--schedule", "0:200:1,200:1000:5,1000:4691:50",
                   "--eval-schedule", "0:4691:469"],
        "analyze_eval": "0:200:20,200:1000:100,1000:4691:469",
        "pilot_threshold": 0.01,
        "rewinds": (0, 300, 1000), "levels": 2, "fraction": 0.6, "seeds": "0,1,2,3,4",
        "instability_seeds": "1,2,3,4",
        "eval_schedule": "4690",
        "ablations": {"rewind": 300,
                      "kinds": ("signs_k_mags_init", "signs_k_mags_0", "permute_layer",
                                "noise")},
        "pretrain": {"steps": 300, "seeds": "0,1,2"},
    },
    "cifar10": {
        "record": ["--model", "resnet20", "--dataset", "cifar10",
                   "--steps", "63000", "--batch-size", "128", "--lr", "0.1",
                   "--schedule", "0:100:1,100:2000:10,2000:63001:500",
                   "--eval-schedule", "0:63001:1000"],
        "analyze_eval": "0:2000:100,2000:63001:1000",
        "pilot_threshold": 0.01,
        "rewinds": (0, 500, 2000), "levels": 3, "fraction": 0.5, "seeds": "0,1,2,3,4",
        "instability_seeds": "1,2,3,4",
        "eval_schedule": "63000",
        "ablations": {"rewind": 2000,
                      "kinds": ("signs_k_mags_init", "signs_k_mags_0", "permute_layer",
                                "noise")},
        "pretrain": {"steps": 2000, "seeds": "0,1,2"},
    },
}
"""Study sizes. ``rewinds`` starts with 0; ``pilot_threshold`` is the smallest error
barrier at k = 0 (a fraction of test error) that lets the study go on past the pilot;
``ablations`` and ``pretrain`` are optional. ``in_process`` runs every command through the
same `ckpt` app in this interpreter instead of a new one each (the smoke size: it spares
the interpreter and import start-up of each command, most of its time)."""

PERMUTATION_RMS = math.sqrt(2.0)
"""Noise scale (in units of the layer's std at k) whose expected change equals that of
permuting the layer's weights: for i.i.d. values, E|w_perm - w|^2 = 2 var per weight."""

ABLATIONS = ("signs_k_mags_init", "signs_k_mags_0", "permute_layer", "noise")
PRETEXT = ("rotation", "blur")


class StableRegime(RuntimeError):
    """The pilot's barrier at k = 0 is below the threshold: IMP cannot show the effect."""


def _ckpt() -> list[str]:
    # the `ckpt` of this interpreter (a `ckpt` on PATH may belong to another install)
    return [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]


def _rewind_options(steps) -> list[str]:
    return sum((["--rewind", str(k)] for k in steps), [])


def commands(out: Path, size: dict, *, device: str, data_root: str | None) -> list[list[str]]:
    """The study as `ckpt` argument lists, in order (the second one is the pilot)."""
    store = str(out / "study.zarr")
    seeds, evals = size["seeds"], ["--eval-schedule", size["eval_schedule"], "--quiet"]
    pairs = ["--seeds", size["instability_seeds"], *evals]
    # the experiments train on the device and data the recorded run names in its config
    record = ["record", *size["record"], "--out", store, "--quiet", "--device", device]
    if data_root:
        record += ["--data-root", data_root]
    levels = range(1, size["levels"] + 1)
    steps = [
        record,
        ["instability", store, "--rewind", "0", *pairs],
        ["analyze", store, "--only", "telemetry", "--quiet"],
        ["analyze", store, "--only", "evaluate", "--eval-steps", size["analyze_eval"],
         "--quiet"],
        ["imp", store, "--levels", str(size["levels"]), "--fraction", str(size["fraction"]),
         "--include-output", *_rewind_options(size["rewinds"]), "--seeds", seeds, *evals],
        *(["ablate", store, "--rewind", "0", "--level", str(n), "--kind", "random_reinit",
           "--seeds", seeds, *evals] for n in levels),
    ]
    if "ablations" in size:
        abl = size["ablations"]
        kinds = sum((["--kind", kind] for kind in abl["kinds"]), [])
        steps.append(["ablate", store, "--rewind", str(abl["rewind"]), "--level",
                      str(size["levels"]), *kinds, "--alpha", f"{PERMUTATION_RMS:.3f}",
                      "--seeds", seeds, *evals])
    if "pretrain" in size:
        for task in PRETEXT:
            steps.append(["pretrain", store, "--task", task,
                          "--steps", str(size["pretrain"]["steps"]),
                          "--levels", str(size["levels"]), "--fraction", str(size["fraction"]),
                          "--include-output", "--seeds", size["pretrain"]["seeds"], *evals])
    steps.append(["instability", store, *_rewind_options(size["rewinds"]), *pairs])
    steps.append(["report", store, "-o", str(out / "report.html")])
    return steps


def _in_process(args: list[str]) -> int:
    """Run one `ckpt` command in this interpreter; its exit status."""
    from ckpt_tools.cli.app import app

    try:
        code = app(args, prog_name="ckpt", standalone_mode=False)
    except SystemExit as exc:  # typer's --help and usage errors
        code = exc.code
    return int(code or 0)


def _run(args: list[str], log, echo: Callable[[str], None], *, in_process: bool) -> None:
    line = "ckpt " + shlex.join(args)
    echo(f"$ {line}")
    start = time.perf_counter()
    code = _in_process(args) if in_process else subprocess.run([*_ckpt(), *args]).returncode
    took = time.perf_counter() - start
    log.write(json.dumps({"command": line, "seconds": round(took, 1),
                          "exit": code}) + "\n")
    log.flush()
    if code:
        raise RuntimeError(f"`{line}` failed (exit {code}); fix the cause and run "
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


def pilot_barrier(store: str | Path) -> tuple[float, int]:
    """The mean stored error barrier at k = 0 (fraction of test error) and its pairs.

    Raises:
        StoreError: no instability result at k = 0 is stored.
    """
    import numpy as np

    from ckpt_tools.analyses.experiments.instability import read_instability

    result = read_instability(store)
    if 0 not in result.rewind_step.values:
        raise StoreError(f"{store} holds no instability barrier at k = 0; run the pilot")
    values = result["barrier"].sel(rewind_step=0).values
    values = values[np.isfinite(values)]
    return float(values.mean()), int(values.size)


def record_config(size: dict, *, device: str = "cpu", data_root: str | None = None):
    """The `TrainConfig` of the size's ``ckpt record`` arguments."""
    from dataclasses import fields

    from ckpt_tools.config import TrainConfig

    types = {f.name: f.type for f in fields(TrainConfig)}
    values: dict = {"device": device, "data_root": data_root}
    args = list(size["record"])
    while args:
        name = args.pop(0)[2:].replace("-", "_")
        if name in ("augment",):
            values[name] = True
            continue
        raw = args.pop(0)
        kind = str(types[name])
        values[name] = int(raw) if "int" in kind else float(raw) if "float" in kind else raw
    return TrainConfig(**values)


def planned_updates(size: dict) -> int:
    """Optimizer updates the size trains in all (dense run, copies, IMP, controls)."""
    cfg = record_config(size)
    total, seeds = cfg.steps, len(size["seeds"].split(","))
    pairs = len(size["instability_seeds"].split(","))
    total += sum(pairs * (cfg.steps - k) for k in size["rewinds"])
    total += size["levels"] * seeds * sum(cfg.steps - k for k in size["rewinds"])
    total += size["levels"] * seeds * cfg.steps  # random re-initialisation
    if "ablations" in size:
        abl = size["ablations"]
        total += seeds * len(abl["kinds"]) * (cfg.steps - abl["rewind"])
    if "pretrain" in size:
        pre = size["pretrain"]
        total += len(PRETEXT) * (pre["steps"] + len(pre["seeds"].split(",")) * size["levels"]
                                 * (cfg.steps - pre["steps"]))
    return total


def time_updates(out: Path, size: dict, *, device: str = "cpu", data_root: str | None = None,
                 updates: int = 50, warmup: int = 5) -> dict:
    """Time `updates` training updates of the size's recorded run (after `warmup` more).

    The run trains and records into ``out/pilot-timing.zarr`` (replaced each time) with
    the size's model, data and batch, checkpointing only its end, so the time per update
    is training's, not start-up's. Returns the timing and the study's projected training
    time (`planned_updates` x seconds per update; evaluation and start-up come on top).
    """
    from ckpt_tools.train import train, with_overrides

    marks: dict[int, float] = {}

    def on_step(step: int, loss: float) -> None:
        marks[step] = time.perf_counter()

    n = warmup + updates
    cfg = with_overrides(record_config(size, device=device, data_root=data_root),
                         steps=n, schedule=f"0:{n + 1}:{n}", eval_schedule=str(n))
    train(cfg, out / "pilot-timing.zarr", overwrite=True, on_step=on_step,
          resume_interval=None)
    per_update = (marks[n] - marks[warmup]) / updates
    planned = planned_updates(size)
    return {"updates": updates, "seconds": round(marks[n] - marks[warmup], 3),
            "seconds_per_update": per_update, "planned_updates": planned,
            "projected_training_hours": planned * per_update / 3600}


def _check_pilot(store: Path, threshold: float, echo: Callable[[str], None]) -> dict:
    barrier, pairs = pilot_barrier(store)
    echo(f"pilot: error barrier at k = 0 is {barrier * 100:.2f} pp (pairs: {pairs}; "
         f"threshold {threshold * 100:.2f} pp)")
    if barrier < threshold:
        raise StableRegime(
            f"pilot: the error barrier at k = 0 is {barrier * 100:.2f} pp, below "
            f"{threshold * 100:.2f} pp: training is stable to SGD noise from the start, so "
            "rewinding to 0 will match dense; raise the learning rate (or lower "
            "--pilot-threshold) and run the study again")
    return {"barrier": barrier, "pairs": pairs, "threshold": threshold}


def run_study(
    out: str | Path,
    size: str = "smoke",
    *,
    device: str = "cpu",
    data_root: str | None = None,
    pilot_threshold: float | None = None,
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
        pilot_threshold: Smallest error barrier at k = 0 (fraction of test error) that
            lets the study go past the pilot; None: the size's. 0 measures the pilot and
            goes on whatever it shows. Recorded in the summary.
        dry_run: Only `echo` the commands.
        summary_only: Only summarise the stored results again.
        echo: Prints a line of progress (the commands, the summary).

    Returns:
        The summary (`study_summary.summarize`), or None for a dry run.

    Raises:
        ValueError: unknown size, or a negative threshold.
        StableRegime: the pilot's barrier is below the threshold (nothing after it ran).
        RuntimeError: a command failed (stored work is kept).
        StoreError: nothing to summarise (run the study first, at the same size).
    """
    from ckpt_tools.analyses.experiments.study_summary import render, summarize

    if size not in SIZES:
        raise ValueError(f"unknown study size {size!r}; known: {', '.join(SIZES)}")
    out, spec = Path(out), SIZES[size]
    threshold = spec["pilot_threshold"] if pilot_threshold is None else pilot_threshold
    if not threshold >= 0:
        raise ValueError(f"--pilot-threshold must be >= 0, got {threshold}")
    steps = commands(out, spec, device=device, data_root=data_root)
    if dry_run:
        for args in steps:
            echo("ckpt " + shlex.join(args))
        return None
    store = out / "study.zarr"
    if not summary_only:
        out.mkdir(parents=True, exist_ok=True)
        timing_file = out / "pilot-timing.json"
        if not timing_file.exists():
            timing = time_updates(out, spec, device=device, data_root=data_root)
            timing_file.write_text(json.dumps(timing, indent=1) + "\n")
            echo(f"pilot: {timing['updates']} updates took {timing['seconds']:.1f} s "
                 f"({timing['seconds_per_update'] * 1000:.0f} ms each); the study trains "
                 f"{timing['planned_updates']:,} updates: about "
                 f"{timing['projected_training_hours']:.1f} h of training here")
        with open(out / "commands.jsonl", "a") as log:
            for i, args in enumerate(steps):
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
                _run(args, log, echo, in_process=spec.get("in_process", False))
                if i == 1:  # the pilot
                    _check_pilot(store, threshold, echo)
    try:
        summary = summarize(store, size, spec, pilot_threshold=threshold)
    except (StoreError, KeyError) as exc:
        raise StoreError(
            f"cannot summarise {store} at size {size!r}: {exc}",
            hint="run the study there first (without --summary-only), at the same --size",
        ) from None
    timing_file = out / "pilot-timing.json"
    if timing_file.exists():
        summary["pilot"]["timing"] = json.loads(timing_file.read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(render(summary))
    echo(render(summary))
    echo(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and {out / 'report.html'}")
    return summary
