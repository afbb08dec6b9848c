"""Telemetry of a history much larger than the memory it uses: peak RSS vs history size.

Writes a synthetic history of --gb GB of raw float32 weights with the store writer, then
computes its telemetry in a fresh process and reports that process's peak resident
memory (``ru_maxrss``): after a warm-up telemetry of the first 32 steps (imports, thread
pools, first allocations), and after the whole telemetry, with the wall time and the
load average. Repeats with a quarter of the steps (--lengths: any fractions of the
history) to show the peak does not grow with the history, each size twice: with glibc's
default allocator settings, whose dynamic mmap threshold lets freed chunk-sized buffers
fragment the heap (RSS creeps up although Python holds no more memory), and with a fixed
threshold (``MALLOC_MMAP_THRESHOLD_``), which shows the working set itself.

With --store, an existing store (e.g. a 30 GB history written once) is measured instead,
and --full-only keeps one allocator setting (glibc's default, or --fixed-threshold).

Usage: python bench/telemetry_memory.py [--gb 2.0] [--params 262144] [--dir DIR]
       python bench/telemetry_memory.py --gb 30 --dir DIR --full-only
       python bench/telemetry_memory.py --store BIG.zarr --full-only --lengths 0.125,0.5,1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from ckpt_tools.synthetic import write_synthetic_history

PROBE = textwrap.dedent("""
    import json, os, resource, sys, time
    import ckpt_tools
    from ckpt_tools.analyses import telemetry

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    history = ckpt_tools.open_history(sys.argv[1])
    telemetry.compute(history.isel(step=slice(0, 32)))
    history = history.isel(step=slice(0, int(sys.argv[2])))
    opened = peak()
    start = time.perf_counter()
    telemetry.compute(history)
    print(json.dumps({"raw": history["params"].nbytes, "opened": opened, "peak": peak(),
                      "seconds": time.perf_counter() - start, "load": os.getloadavg()[0]}))
""")


def probe(store: Path, steps: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(store), str(steps)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="raw float32 GB of weights")
    parser.add_argument("--params", type=int, default=1 << 18, help="weights per step")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--store", type=Path, default=None, help="measure this store instead")
    parser.add_argument("--full-only", action="store_true",
                        help="one allocator setting: glibc's default (or --fixed-threshold)")
    parser.add_argument("--fixed-threshold", action="store_true",
                        help="with --full-only: the fixed mmap threshold instead")
    parser.add_argument("--lengths", default=None,
                        help="fractions of the history to measure, comma-separated "
                        "(default: 0.25,1; with --full-only: 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        store = args.store or scratch / "synthetic.zarr"
        if args.store is None:
            n_steps = max(int(args.gb * 1e9 / (4 * args.params)), 16)
            start = time.perf_counter()
            write_synthetic_history(store, n_steps=n_steps, n_params=args.params)
            print(f"wrote {n_steps} steps in {time.perf_counter() - start:.0f} s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        else:
            import ckpt_tools

            n_steps = ckpt_tools.open_history(store).sizes["step"]
        mib = 1 << 20
        print(f"{'allocator':>22} {'steps':>6} {'raw GB':>7} {'RSS warm':>9} {'peak RSS':>9} "
              f"{'growth':>8} {'raw/peak':>8} {'GB/s':>6} {'seconds':>8} {'load':>5}")
        settings = (("glibc default", {}),
                    ("mmap threshold 4 MiB", {"MALLOC_MMAP_THRESHOLD_": "4194304"}))
        if args.full_only:
            settings = settings[1:] if args.fixed_threshold else settings[:1]
        lengths = args.lengths or ("1" if args.full_only else "0.25,1")
        lengths = [max(int(float(f) * n_steps), 1) for f in lengths.split(",")]
        figures = []
        for label, env in settings:
            for steps in lengths:
                m = probe(store, steps, env)
                growth = m["peak"] - m["opened"]
                figures.append({"allocator": label, "steps": steps, **m})
                print(f"{label:>22} {steps:6d} {m['raw'] / 1e9:7.2f} {m['opened'] / mib:5.0f} MiB "
                      f"{m['peak'] / mib:5.0f} MiB {growth / mib:4.0f} MiB "
                      f"{m['raw'] / m['peak']:7.1f}x {m['raw'] / m['seconds'] / 1e9:6.3f} "
                      f"{m['seconds']:8.0f} {m['load']:5.1f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
