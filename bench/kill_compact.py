"""Kill `ckpt compact` at random moments: the history must read the same, bit for bit.

    python bench/kill_compact.py --trials 20

Writes a history uncompressed (``codec="none"``): a sharded `params` array (rows of
more than four chunks), an unsharded `buffers` array, gradient norms and a loss, from a
seeded random walk, and the same rows once more with the default codec as the reference
for the finished layout. Then `ckpt compact` subprocesses run on a copy and are killed
(SIGKILL; every `--sigint-every`-th trial Ctrl-C instead) at a random moment of their
work (once they hold the group's lock), and run again. After every kill:

- the store opens (`ckpt_tools.open_store` and plain `xarray.open_datatree`);
- every row of `params`, `buffers`, `grad_norm` and `loss` read through ckpt-tools, and
  `params` and `buffers` read by TensorStore, equal the rows written, bit for bit;
- the store takes no more disk than before compaction plus its largest file.

When a compaction completes, every chunk file of `params` and `buffers` must equal the
reference's byte for byte, and the array metadata too; then a fresh copy is compacted,
until `--trials` kills have been made. Prints the figures; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
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
from ckpt_tools.store import HistoryWriter, StoreError
from ckpt_tools.store.compact import PROGRESS_NAME
from ckpt_tools.store.lock import LOCK_NAME, holder_of
from ckpt_tools.tensors import TensorSpec

ROWS = ("params", "buffers", "grad_norm", "loss")


@dataclass
class Tally:
    kills: int = 0
    sigint: int = 0
    sigint_clean: int = 0
    mid_compaction: int = 0
    runs_completed: int = 0
    runs_identical: int = 0
    reads_altered: int = 0
    open_failures: int = 0
    over_disk: int = 0
    max_extra: int = 0
    notes: list[str] = field(default_factory=list)


def _bits(values: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(values)
    return values.view(f"u{values.dtype.itemsize}") if values.dtype.kind == "f" else values


def write_history(path: Path, rows: dict[str, np.ndarray], codec: str) -> None:
    """Write `rows` (params, buffers, grad_norm, loss) as one history with `codec`."""
    n_steps, n_p = rows["params"].shape
    n_b = rows["buffers"].shape[1]
    params = [TensorSpec("w", (n_p - 8,), 0, "float32", True),
              TensorSpec("b", (8,), n_p - 8, "float32", False)]
    buffers = [TensorSpec("bn.running_mean", (n_b,), 0, "float32", False)]
    writer = HistoryWriter.create(
        path, "train", steps=list(range(n_steps)), params=params, buffers=buffers,
        attrs={"config": {}}, root_attrs={"synthetic": True}, codec=codec,
    )
    try:
        for start in range(0, n_steps, 16):
            stop = min(start + 16, n_steps)
            writer.write_rows(start, rows["params"][start:stop], rows["buffers"][start:stop],
                              rows["grad_norm"][start:stop],
                              {"loss": rows["loss"][start:stop]})
            writer.commit(np.arange(start, stop))
    finally:
        writer.close()


def make_rows(n_steps: int, n_params: int, n_buffers: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded random walk, like recorded weights: they change a little per step."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, width in (("params", n_params), ("buffers", n_buffers)):
        walk = np.empty((n_steps, width), np.float32)
        walk[0] = rng.standard_normal(width, dtype=np.float32) * np.float32(0.2)
        for i in range(1, n_steps):
            walk[i] = walk[i - 1] + np.float32(1e-3) * rng.standard_normal(width,
                                                                            dtype=np.float32)
        out[name] = walk
    out["params"][3, :5] = np.array([0x7FC00001, 0xFFC00000, 0x7F800001, 0, 0x80000000],
                                    np.uint32).view(np.float32)  # odd NaNs and signed zeros
    out["grad_norm"] = rng.random((n_steps, 2), dtype=np.float32)
    out["loss"] = np.linspace(2.0, 0.5, n_steps)
    return out


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ckpt() -> list[str]:
    return [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]


def check_reads(store: Path, rows: dict[str, np.ndarray], tally: Tally) -> bool:
    """Whether every reader sees exactly `rows` (counts failures in `tally`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            xr.open_datatree(store, engine="zarr").close()
        ds = ckpt_tools.open_store(store)["train"].to_dataset()
    except (StoreError, Exception) as exc:  # noqa: BLE001 - any failure to open counts
        tally.open_failures += 1
        tally.notes.append(f"open failed: {exc.__class__.__name__}: {exc}")
        return False
    same = all(np.array_equal(_bits(ds[n].values), _bits(rows[n])) for n in ROWS)
    try:
        import tensorstore as ts
    except ImportError:
        ts = None
    if ts is not None:
        for name in ("params", "buffers"):
            spec = {"driver": "zarr3",
                    "kvstore": {"driver": "file", "path": str(store / "train" / name)}}
            theirs = ts.open(spec).result().read().result()
            same = same and np.array_equal(_bits(theirs), _bits(rows[name]))
    if not same:
        tally.reads_altered += 1
    return same


def chunk_files(store: Path) -> dict[str, bytes]:
    """Every file of `params` and `buffers` (chunks, shards and metadata) by path."""
    out = {}
    for name in ("params", "buffers"):
        for f in sorted((store / "train" / name).rglob("*")):
            if f.is_file():
                rel = f.relative_to(store).as_posix()
                out[rel] = (json.dumps(json.loads(f.read_bytes()), sort_keys=True).encode()
                            if f.name == "zarr.json" else f.read_bytes())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="kills to make")
    ap.add_argument("--steps", type=int, default=70, help="rows (a partial last block)")
    ap.add_argument("--params", type=int, default=1_200_000, help="weights per row (sharded)")
    ap.add_argument("--buffers", type=int, default=300_000, help="buffer values per row")
    ap.add_argument("--sigint-every", type=int, default=5, help="every n-th kill is Ctrl-C")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="kill_compact_"))
    t0 = time.monotonic()
    rows = make_rows(args.steps, args.params, args.buffers, args.seed)
    pristine, reference = work / "raw.zarr", work / "lz4.zarr"
    write_history(pristine, rows, "none")
    write_history(reference, rows, "lz4")
    expected = chunk_files(reference)
    raw_size = _du(pristine)
    largest = max(f.stat().st_size for f in (pristine / "train").rglob("*") if f.is_file())
    victim = work / "victim.zarr"
    shutil.copytree(pristine, victim)
    start = time.monotonic()
    done = subprocess.run([*_ckpt(), "compact", str(victim)], check=True, capture_output=True,
                          text=True)
    full = time.monotonic() - start
    own = float(done.stdout.rsplit(" in ", 1)[1].split(" s")[0])  # without start-up
    print(f"history: {args.steps} rows x ({args.params:,} + {args.buffers:,}) float32, "
          f"{raw_size / 2**20:.1f} MiB raw on disk; uninterrupted `ckpt compact`: {full:.2f} s "
          f"({own:.2f} s after start-up)")
    tally = Tally()
    shutil.rmtree(victim)
    shutil.copytree(pristine, victim)
    while tally.kills < args.trials:
        proc = subprocess.Popen([*_ckpt(), "compact", str(victim)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        # Most kills should land while it works, not while Python starts: wait until it
        # holds the group's lock, then draw the delay over the compaction's own length.
        lock = victim / "train" / LOCK_NAME
        while proc.poll() is None and holder_of(lock).get("pid") != proc.pid:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.1) * own)
        if proc.poll() is None:
            tally.kills += 1
            sigint = args.sigint_every and tally.kills % args.sigint_every == 0
            proc.send_signal(signal.SIGINT if sigint else signal.SIGKILL)
            out, _ = proc.communicate()
            if sigint:
                tally.sigint += 1
                tally.sigint_clean += proc.returncode == 130 and "again" in out
            if (victim / "train" / PROGRESS_NAME).is_file():
                tally.mid_compaction += 1
            extra = _du(victim) - raw_size
            tally.max_extra = max(tally.max_extra, extra)
            tally.over_disk += extra > largest
            check_reads(victim, rows, tally)
            continue
        out, _ = proc.communicate()
        if proc.returncode != 0:
            tally.notes.append(f"compact failed: {out.strip()[-300:]}")
            tally.open_failures += 1
        tally.runs_completed += 1
        same = check_reads(victim, rows, tally) and chunk_files(victim) == expected
        same = same and not (victim / "train" / PROGRESS_NAME).exists()
        tally.runs_identical += same
        print(f"compaction completed, files byte-identical to recording with lz4: {same}")
        shutil.rmtree(victim)
        shutil.copytree(pristine, victim)
    print(f"kills: {tally.kills}  (SIGKILL {tally.kills - tally.sigint}, SIGINT {tally.sigint}, "
          f"SIGINT exits clean with the resume command {tally.sigint_clean}/{tally.sigint})")
    print(f"kills that caught a compaction half done: {tally.mid_compaction}")
    print(f"reads altered: {tally.reads_altered}  failed opens: {tally.open_failures}  "
          f"stores over raw size + largest file: {tally.over_disk}")
    print(f"largest extra disk seen after a kill: {tally.max_extra / 2**20:.2f} MiB "
          f"(largest raw file {largest / 2**20:.2f} MiB)")
    print(f"runs completed: {tally.runs_completed}, identical to the reference: "
          f"{tally.runs_identical}/{tally.runs_completed}")
    print(f"wall time {time.monotonic() - t0:.0f} s")
    for note in tally.notes[:5]:
        print("note:", note)
    shutil.rmtree(work, ignore_errors=True)
    bad = tally.reads_altered or tally.open_failures or tally.over_disk or (
        tally.runs_identical != tally.runs_completed)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
