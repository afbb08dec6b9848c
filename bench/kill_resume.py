"""Kill `ckpt record` at random moments, resume it, and check that nothing is ever lost.

    python bench/kill_resume.py --trials 20

One uninterrupted reference run, then a victim store recorded by `ckpt record`
subprocesses that are killed (SIGKILL; every `--sigint-every`-th trial Ctrl-C instead)
after a random delay and continued with `ckpt record --resume`. After every kill:

- the store opens (`ckpt_tools.open_store` and plain `xarray.open_datatree`);
- every step it shows equals the reference's bit for bit (parameters, buffers, gradient
  norms, loss, lr, epoch, and every shown evaluation);
- no step shown before the kill has disappeared or changed.

When a run completes, its whole history must equal the reference's bitwise (and hold no
resume state); then a new victim run starts, until `--trials` kills have been made.
Prints the figures and exits 1 if any step was lost or altered.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

import ckpt_tools
from ckpt_tools.store import StoreError
from ckpt_tools.store.resume import RESUME_ARRAYS, read_group_meta

ROWS = ("params", "buffers", "grad_norm", "loss", "lr", "epoch")


@dataclass
class Tally:
    trials: int = 0
    sigkill: int = 0
    sigint: int = 0
    sigint_clean: int = 0
    sigint_hint: int = 0
    finished_before_kill: int = 0
    mid_training: int = 0
    steps_recovered: int = 0
    steps_lost: int = 0
    steps_altered: int = 0
    evals_altered: int = 0
    open_failures: int = 0
    xarray_warnings: int = 0
    runs_completed: int = 0
    runs_identical: int = 0
    notes: list[str] = field(default_factory=list)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ckpt() -> list[str]:
    return [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]


def _bits(values: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(values)
    return values.view(f"u{values.dtype.itemsize}") if values.dtype.kind == "f" else values


def _visible(path: Path) -> xr.Dataset | None:
    """The victim's history as a reader sees it (None before the group exists)."""
    if not (path / "zarr.json").is_file() or not (path / "train" / "zarr.json").is_file():
        return None
    try:
        ckpt_tools.open_store(path)
        return ckpt_tools.open_history(path).load()
    except StoreError as exc:
        if "has no group" in str(exc) or "incomplete" in str(exc):
            return None  # killed while creating the group: nothing was recorded yet
        raise


def check(path: Path, ref: xr.Dataset, seen: dict[int, bytes], tally: Tally) -> int:
    """Compare what the victim shows with the reference; return the visible step count."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if (path / "zarr.json").is_file():
                xr.open_datatree(path, engine="zarr").load()
        tally.xarray_warnings += len(caught)
        ds = _visible(path)
    except Exception as exc:  # the store must always open
        tally.open_failures += 1
        tally.notes.append(f"open failed: {exc.__class__.__name__}: {exc}")
        return 0
    steps = [] if ds is None else [int(s) for s in ds.step.values]
    for step in steps:
        mine = ds.sel(step=step)
        theirs = ref.sel(step=step)
        digest = b"".join(_bits(mine[n].values).tobytes() for n in ROWS)
        if digest != b"".join(_bits(theirs[n].values).tobytes() for n in ROWS):
            tally.steps_altered += 1
            tally.notes.append(f"step {step} differs from the reference")
        seen[step] = digest
    lost = sorted(set(seen) - set(steps))
    tally.steps_lost += len(lost)
    for step in lost:
        tally.notes.append(f"step {step} was visible and is gone")
        del seen[step]
    if ds is not None and "eval_step" in ds.dims:
        for e in ds.eval_step.values:
            for name in ("test_loss", "test_accuracy"):
                a = ds[name].sel(eval_step=e).values
                b = ref[name].sel(eval_step=e).values
                if _bits(a).tobytes() != _bits(b).tobytes():
                    tally.evals_altered += 1
    return len(steps)


def identical(path: Path, ref_path: Path) -> bool:
    """Whether the finished victim equals the reference array by array, byte by byte."""
    import zarr

    a = zarr.open_group(str(ref_path / "train"), mode="r")
    b = zarr.open_group(str(path / "train"), mode="r")
    names = {*a.array_keys()}
    if {*b.array_keys()} != names or any(n in names for n in RESUME_ARRAYS):
        return False
    same = all(np.array_equal(_bits(a[n][...]), _bits(b[n][...])) for n in names)
    return same and bool(read_group_meta(path, "train").get("complete"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="kills to make")
    ap.add_argument("--model", default="convnet")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--schedule", default="0:40:1,40:241:4")
    ap.add_argument("--eval-schedule", default="0:241:60")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between resume points")
    ap.add_argument("--sigint-every", type=int, default=5, help="every n-th trial sends Ctrl-C")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    ref_path, run = work / "ref.zarr", work / "run.zarr"
    shutil.rmtree(ref_path, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    opts = ["--model", args.model, "--width", str(args.width), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--schedule", args.schedule,
            "--eval-schedule", args.eval_schedule, "--quiet"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.monotonic()
    subprocess.run([*_ckpt(), "record", *opts, "--out", str(ref_path)], check=True, env=env,
                   capture_output=True)
    t_ref = time.monotonic() - t0
    ref = ckpt_tools.open_history(ref_path).load()
    print(f"reference: {ref.sizes['step']} steps recorded in {t_ref:.1f} s ({ref_path})")
    tally, seen, t_run = Tally(), {}, t_ref
    started = time.monotonic()
    while tally.trials < args.trials:
        fresh = not (run / "train" / "zarr.json").is_file()
        cmd = ([*_ckpt(), "record", *opts, "--out", str(run)] if fresh else
               [*_ckpt(), "record", "--resume", str(run), "--quiet"])
        cmd += ["--resume-interval", str(args.interval)]
        # Ctrl-C as at a terminal: a parent running in the background may ignore SIGINT,
        # and children would inherit that.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_default_sigint)
        use_sigint = args.sigint_every > 0 and (tally.trials + 1) % args.sigint_every == 0
        t_start = time.monotonic()
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.0) * t_run)
            tally.finished_before_kill += 1
            if fresh:  # the machine got faster: aim the next kills at the run's new length
                t_run = time.monotonic() - t_start
        except subprocess.TimeoutExpired:
            before = len(seen)
            proc.send_signal(signal.SIGINT if use_sigint else signal.SIGKILL)
            _, err = proc.communicate()
            tally.trials += 1
            if use_sigint:
                tally.sigint += 1
                # 130 with the resume hint once training runs; before that (start-up) 130
                # or Python's own SIGINT exit (-2); 0 if it came as the run finished; never
                # a traceback.
                tally.sigint_clean += proc.returncode in (0, 130, -2) and "Traceback" not in err
                tally.sigint_hint += proc.returncode == 130 and "--resume" in err
            else:
                tally.sigkill += 1
            visible = check(run, ref, seen, tally)
            tally.steps_recovered += visible
            tally.mid_training += before < visible < ref.sizes["step"]
            print(f"trial {tally.trials:3d}: {'SIGINT ' if use_sigint else 'SIGKILL'} "
                  f"rc={proc.returncode:4d}  steps shown {before:4d} -> {visible:4d}")
            continue
        if proc.returncode != 0:
            tally.notes.append(f"exit {proc.returncode}: {proc.stderr.read().strip()[-300:]}")
            print(f"run failed: {tally.notes[-1]}")
            break
        check(run, ref, seen, tally)
        tally.runs_completed += 1
        same = identical(run, ref_path)
        tally.runs_identical += same
        print(f"run {tally.runs_completed} complete: bitwise identical to the reference: {same}")
        shutil.rmtree(run)
        seen.clear()
    if (run / "train" / "zarr.json").is_file():  # finish the last victim run
        done = subprocess.run([*_ckpt(), "record", "--resume", str(run), "--quiet"], env=env,
                              capture_output=True, text=True)
        check(run, ref, seen, tally)
        tally.runs_completed += 1
        same = done.returncode == 0 and identical(run, ref_path)
        tally.runs_identical += same
        print(f"run {tally.runs_completed} complete: bitwise identical to the reference: {same}")
    elapsed = time.monotonic() - started
    print(f"\ntrials (kills): {tally.trials}  (SIGKILL {tally.sigkill}, SIGINT {tally.sigint}, "
          f"SIGINT exits clean {tally.sigint_clean}/{tally.sigint}, with the resume command "
          f"{tally.sigint_hint})")
    print(f"kills that caught a process after it had stored new steps, before the end: "
          f"{tally.mid_training}")
    print(f"steps recovered (shown after kills): {tally.steps_recovered}")
    print(f"steps lost: {tally.steps_lost}  steps altered: {tally.steps_altered}  "
          f"evaluations altered: {tally.evals_altered}  failed opens: {tally.open_failures}")
    print(f"runs completed: {tally.runs_completed}, bitwise identical to the reference: "
          f"{tally.runs_identical}/{tally.runs_completed}")
    print(f"xarray warnings while opening killed stores: {tally.xarray_warnings}")
    print(f"wall time {elapsed:.0f} s; reference run {t_ref:.1f} s; work dir {work}")
    for note in tally.notes[:10]:
        print("  note:", note)
    bad = (tally.steps_lost or tally.steps_altered or tally.evals_altered
           or tally.open_failures or tally.runs_identical != tally.runs_completed
           or tally.sigint_clean != tally.sigint or tally.trials < args.trials)
    if args.workdir is None and not bad:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
