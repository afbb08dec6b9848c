"""Memory of `ckpt import` against the size of what it imports.

Writes a series of checkpoints of one synthetic model (float32 safetensors files, or
PyTorch files with --format torch), then runs `ckpt import` on the first N of them and
on all of them in fresh processes, sampling each process's resident memory every 10 ms
from /proc: anonymous memory (what the process allocated) and file-backed memory (pages
of the memory-mapped checkpoints, which the kernel can drop at any time). Baseline, in
the same run: an interpreter that only imports the same libraries. The import's own
memory is its peak anonymous memory less the baseline's; it should not grow with the
number of checkpoints (N/2 against N) nor with the model (run two --params).

Usage: python bench/import_memory.py [--params 20000000] [--checkpoints 8] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BASELINE = "import ckpt_tools.cli.app, ckpt_tools.importer, safetensors.torch, zarr, xarray"


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure(cmd: list[str]) -> dict:
    """Peak RssAnon/RssFile/VmRSS of `cmd` sampled every 10 ms, and its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while proc.poll() is None:
        for key, value in _status(proc.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed:\n{out}\n{err}")
    return {**peak, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=20_000_000)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--format", choices=["safetensors", "torch"], default="safetensors")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        from safetensors.torch import save_file

        series = work / "series"
        series.mkdir()
        gen = torch.Generator().manual_seed(0)
        cols = 1000
        state = {"a.weight": torch.randn(args.params // cols - 1, cols, generator=gen),
                 "b.weight": torch.randn(cols, generator=gen)}
        for step in range(args.checkpoints):
            state = {k: v + 0.001 for k, v in state.items()}
            if args.format == "safetensors":
                save_file(state, str(series / f"step-{step}.safetensors"))
            else:
                torch.save(state, series / f"step-{step}.pt")
        ckpt_bytes = args.params * 4
        ckpt = [str(Path(sys.executable).parent / "ckpt")]
        results = {"params": args.params, "checkpoint_mib": ckpt_bytes / 2**20,
                   "format": args.format}
        results["baseline"] = measure([sys.executable, "-c", BASELINE])
        files = sorted(series.iterdir(), key=lambda p: int(p.stem.split("-")[1]))
        for n in (args.checkpoints // 2, args.checkpoints):
            out = work / f"run{n}.zarr"
            r = measure([*ckpt, "import", *map(str, files[:n]), "--out", str(out), "--quiet"])
            r["series_mib"] = n * ckpt_bytes / 2**20
            results[f"import_{n}"] = r
            shutil.rmtree(out)
        print(json.dumps(results, indent=1))
        mib = 2**20
        for key, r in results.items():
            if isinstance(r, dict):
                own = (r["RssAnon"] - results["baseline"]["RssAnon"]) / mib
                print(f"{key:>10}: own {own:6.0f} MiB  anon {r['RssAnon'] / mib:7.0f} MiB  "
                      "file-backed "
                      f"{r['RssFile'] / mib:7.0f} MiB  total {r['VmRSS'] / mib:7.0f} MiB  "
                      f"({r['seconds']:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
