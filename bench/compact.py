"""What `ckpt compact` costs on a run recorded with ``--codec none``: time, ratio, disk.

    python bench/compact.py                     # records the default run first
    python bench/compact.py --store RUN.zarr    # compacts a copy of a raw store

Records the default `ckpt record` run uncompressed (or copies `--store`), then runs
`ckpt compact` on it in a subprocess while this process samples the store's size on
disk every millisecond or so. Prints the compaction's wall time and raw throughput,
stored/raw before and after (as `ckpt info` computes it), the largest extra disk
sampled and the largest file written (the bound), and checks that `params` and
`buffers` read the same bits before and after (SHA-256 of every committed row).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ckpt_tools.store import open_history, store_info


def _ckpt() -> list[str]:
    return [sys.executable, "-c", "from ckpt_tools.cli import main; main()"]


def _du(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except FileNotFoundError:  # renamed away while we looked
            pass
    return total


def digest(store: Path) -> str:
    """SHA-256 of the bits of every committed row of `params` and `buffers`."""
    ds = open_history(store)
    h = hashlib.sha256()
    for name in ("params", "buffers"):
        for start in range(0, ds.sizes["step"], 64):
            block = np.ascontiguousarray(ds[name].isel(step=slice(start, start + 64)).values)
            h.update(block.view(np.uint32).tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="a store recorded --codec none")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--record-args", default="", help="extra `ckpt record` options")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="compact_"))
    store = work / "raw.zarr"
    if args.store is None:
        start = time.monotonic()
        subprocess.run([*_ckpt(), "record", "--codec", "none", "--quiet", "--out", str(store),
                        *args.record_args.split()], check=True)
        print(f"recorded the default run with --codec none in {time.monotonic() - start:.0f} s")
    else:
        shutil.copytree(args.store, store)
    info = store_info(store)["groups"][0]
    before_digest = digest(store)
    size0 = _du(store)
    peak, stop = [size0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _du(store))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    done = subprocess.run([*_ckpt(), "compact", str(store)], capture_output=True, text=True)
    wall = time.monotonic() - start
    stop.set()
    sampler.join()
    if done.returncode != 0:
        print(done.stdout + done.stderr)
        return 1
    after = store_info(store)["groups"][0]
    largest = max(f.stat().st_size for n in ("params", "buffers")
                  for f in (store / "train" / n).rglob("*") if f.is_file())
    same = digest(store) == before_digest
    print(done.stdout.strip())
    print(f"history: {info['steps']} checkpoints x {info['parameters']:,} parameters "
          f"(+ {info['buffer_elements']:,} buffer values), raw float32 "
          f"{info['raw_bytes'] / 2**20:.1f} MiB")
    own = float(done.stdout.rsplit(" in ", 1)[1].split(" s")[0])  # the command's own figure
    print(f"compact: {own:.1f} s ({info['raw_bytes'] / own / 1e9:.3f} GB/s of raw float32); "
          f"{wall:.1f} s wall with the process's start-up")
    print(f"stored/raw before: {info['ratio']:.3f} (codec {info['codec']}), after: "
          f"{after['ratio']:.3f} (codec {after['codec']})")
    print(f"peak extra disk sampled: {(peak[0] - size0) / 2**20:.2f} MiB; largest file "
          f"written: {largest / 2**20:.2f} MiB; store {size0 / 2**20:.1f} -> "
          f"{_du(store) / 2**20:.1f} MiB")
    print(f"params and buffers bit for bit the same after: {same}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
