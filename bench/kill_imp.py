"""Kill `ckpt imp` at random moments, run it again, and check that no level is ever lost.

    python bench/kill_imp.py --trials 8

A dense run is recorded once and copied: the reference runs `ckpt imp` without
interruption; the victim's `ckpt imp` is killed with SIGKILL after a random delay and
started again with the same command (which continues level by level) until it completes;
then a fresh copy is attacked, until `--trials` kills have been made. After every kill
the store must open, every committed row of every history group (dense and IMP levels)
must equal the reference's bit for bit, and every written mask level must equal the
reference's. Every completed run must equal the reference in every history and mask.
Prints the figures; exits 1 on any lost or altered row.
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
from pathlib import Path

import numpy as np
import zarr

import ckpt_tools
from ckpt_tools.store import StoreError, history_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill_resume import ROWS, _bits, _ckpt  # noqa: E402


def _mask_groups(path: Path) -> list[str]:
    root = zarr.open_group(str(path), mode="r")
    found = []

    def walk(prefix: str, group) -> None:
        for name, sub in group.groups():
            where = f"{prefix}{name}"
            if (sub.attrs.get("ckpt_tools") or {}).get("kind") == "masks":
                found.append(where)
            walk(f"{where}/", sub)

    walk("", root)
    return sorted(found)


def compare(run: Path, ref: Path, *, final: bool) -> tuple[int, int, list[str]]:
    """(rows shown, rows or mask levels that differ, notes) for the victim vs the reference."""
    shown, bad, notes = 0, 0, []
    ckpt_tools.open_store(run)
    if final and (history_groups(run) != history_groups(ref)
                  or _mask_groups(run) != _mask_groups(ref)):
        bad += 1
        notes.append(f"groups {history_groups(run)} != {history_groups(ref)}")
    for group in history_groups(run):
        ds = ckpt_tools.open_history(run, group).load()
        rf = ckpt_tools.open_history(ref, group).load()
        steps = ds.step.values
        shown += len(steps)
        if final and steps.tolist() != rf.step.values.tolist():
            bad += 1
            notes.append(f"{group}: steps {steps.tolist()} != {rf.step.values.tolist()}")
        for name in ROWS:
            if name in ds and _bits(ds[name].values).tobytes() != _bits(
                rf[name].sel(step=steps).values
            ).tobytes():
                bad += 1
                notes.append(f"{group}: '{name}' differs")
    for group in _mask_groups(run):
        mine = zarr.open_group(str(run / group), mode="r")
        theirs = zarr.open_group(str(ref / group), mode="r")
        written = np.asarray(mine["written"][:], bool)  # levels grow one row at a time
        levels = len(written)
        if final and not np.array_equal(written, np.asarray(theirs["written"][:], bool)):
            bad += 1
            notes.append(f"{group}: written levels differ")
        if not np.array_equal(np.asarray(mine["mask"][:levels])[written],
                              np.asarray(theirs["mask"][:levels])[written]):
            bad += 1
            notes.append(f"{group}: a written mask level differs")
    return shown, bad, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8, help="kills to make")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill-imp-"))
    work.mkdir(parents=True, exist_ok=True)
    dense, ref, run = work / "dense.zarr", work / "ref.zarr", work / "run.zarr"
    for path in (dense, ref, run):
        shutil.rmtree(path, ignore_errors=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    steps = args.steps
    subprocess.run([*_ckpt(), "record", "--model", "convnet", "--width", "4", "--steps",
                    str(steps), "--batch-size", "64", "--schedule", f"0:{steps + 1}:1",
                    "--eval-schedule", f"0:{steps + 1}:{steps // 2}", "--quiet",
                    "--out", str(dense)], check=True, env=env, capture_output=True)
    shutil.copytree(dense, ref)
    shutil.copytree(dense, run)
    imp = ["imp", "--levels", str(args.levels), "--rewind", "3", "--seeds", "0",
           "--schedule", f"0:{steps + 1}:{max(1, steps // 20)}", "--quiet"]
    t0 = time.monotonic()
    subprocess.run([*_ckpt(), *imp[:1], str(ref), *imp[1:]], check=True, env=env,
                   capture_output=True)
    t_ref = time.monotonic() - t0
    print(f"reference IMP: {args.levels} levels in {t_ref:.1f} s", flush=True)
    kills, recovered, altered, notes = 0, 0, 0, []
    runs, identical, fresh, t_run, failed = 0, 0, False, t_ref, False
    while True:
        proc = subprocess.Popen([*_ckpt(), imp[0], str(run), *imp[1:]], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killing = kills < args.trials
        t_start = time.monotonic()
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.0) * t_run if killing else None)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
            fresh = False
            try:
                shown, bad, why = compare(run, ref, final=False)
            except StoreError as exc:
                shown, bad, why = 0, 1, [f"store does not open: {exc}"]
            recovered += shown
            altered += bad
            notes += why
            print(f"kill {kills:3d}: rows shown {shown:4d}, differing {bad}", flush=True)
            continue
        if proc.returncode != 0:
            notes.append(f"ckpt imp exited {proc.returncode}: {proc.stderr.read()[-300:]}")
            failed = True
            break
        if fresh:  # the machine got faster: aim the next kills at the new length
            t_run = time.monotonic() - t_start
        shown, bad, why = compare(run, ref, final=True)
        altered += bad
        notes += why
        runs += 1
        identical += bad == 0
        print(f"IMP run {runs} complete: identical to the reference: {bad == 0}", flush=True)
        if kills >= args.trials:
            break
        shutil.rmtree(run)
        shutil.copytree(dense, run)
        fresh = True
    print(f"\nkills: {kills}; rows shown after kills (recovered): {recovered}; rows or mask "
          f"levels lost or altered: {altered}; runs completed: {runs}, identical to the "
          f"reference: {identical}/{runs}")
    for note in notes[:10]:
        print("  note:", note)
    bad_run = altered or failed or identical != runs or kills < args.trials
    if args.workdir is None and not bad_run:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad_run else 0


if __name__ == "__main__":
    sys.exit(main())
