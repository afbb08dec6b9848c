"""Recording large models every step within a host-memory budget.

Usage::

    python bench/record_scale.py [--sizes 1M,10M,100M,500M] [--host-memory 1GiB]
                                 [--writers 1,2] [--workdir DIR]

For each size, a synthetic model (eight parameter tensors; every step adds a fixed random
drift to each, so neighbouring steps share sign, exponent and high mantissa bits like
recorded weights) is recorded at every step for enough steps to fill several chunks, with
1 and with 2 writer processes. Reported, per run:

- **peak memory growth**: the highest proportional set size (PSS: shared pages counted
  once) of this process and its writer processes together, sampled every 10 ms, minus
  the same before the `Recorder` was made; against the budget;
- **record ms**: median time of one `record` call on the training thread;
- **GB/s**: raw float32 bytes recorded / wall time from the first `record` to the end
  of `close` (everything compressed, written and committed); the "training" step is a
  single in-place add, so this is the pipeline's throughput.

Baselines measured in the same run: the disk's write speed (16 MiB files written and
renamed into place, as Zarr writes chunks, no fsync) and the codec's single-core speed
(the writers' work on one chunk: transpose to time-major, blosc LZ4 with bit shuffle, one
thread). Target: throughput at least 80% of min(writers x codec speed, disk speed).

``--json FILE`` also writes the figures as JSON (used by ``tests/test_memory.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ckpt_tools
from ckpt_tools.recording.budget import parse_bytes, plan
from ckpt_tools.store.layout import PARAM_CHUNK

MiB = 1 << 20


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class _PeakMemory:
    """Samples the PSS of this process and its children every `interval` seconds."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return sum(_pss(p) for p in _tree(os.getpid()))

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


class _Synthetic(nn.Module):
    """`n` parameters in eight tensors, plus a fixed drift per tensor."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        sizes = [n // 8 + (1 if k < n % 8 else 0) for k in range(8)]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in sizes)
        self.drift = [torch.randn(s, generator=gen) * 1e-4 for s in sizes]

    @torch.no_grad()
    def step(self):
        for p, d in zip(self.weights, self.drift, strict=True):
            p.add_(d)


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def disk_speed(workdir: Path, total: int = 1 << 30) -> float:
    """GB/s writing 16 MiB files to temporary names and renaming them (no fsync)."""
    block = np.random.default_rng(0).integers(0, 255, 16 * MiB, dtype=np.uint8).tobytes()
    folder = workdir / "disk"
    folder.mkdir()
    start = time.perf_counter()
    for k in range(total // len(block)):
        tmp = folder / f"{k}.partial"
        with open(tmp, "wb") as f:
            f.write(block)
        os.replace(tmp, folder / str(k))
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return total / seconds / 1e9


def codec_speed(model: _Synthetic, rows: int = 16) -> float:
    """GB/s of raw float32 through one core: transpose to time-major, blosc LZ4 bitshuffle."""
    import numcodecs
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)
    codec = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE,
                            typesize=4)
    width = min(1 << 18, model.weights[0].numel())
    first = model.weights[0].detach()[:width].numpy()
    drift = model.drift[0][:width].numpy()
    block = np.stack([first + k * drift for k in range(rows)]).astype(np.float32)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        codec.encode(np.ascontiguousarray(block.T))
        times.append(time.perf_counter() - start)
    return block.nbytes / statistics.median(times) / 1e9


def record_run(n: int, *, writers: int, host_memory: int, workdir: Path,
               steps: int | None = None) -> dict:
    """Record `steps` steps of an `n`-parameter synthetic model; return the figures."""
    model = _Synthetic(n)
    model.step()
    path = workdir / f"scale-{n}-{writers}.zarr"
    meter = _PeakMemory()
    before = meter.now()
    times = []
    rows = plan({"params": n, "buffers": 0, "grad_norm": 8}, {"params": PARAM_CHUNK},
                budget=host_memory, writers=writers).rows
    steps = steps or max(3, min(4 * rows, math.ceil(3e9 / (4 * n))))
    with meter:
        start = time.perf_counter()
        rec = ckpt_tools.Recorder(path, model, f"0:{steps}:1", host_memory=host_memory,
                                  writers=writers)
        first = time.perf_counter()
        for step in range(steps):
            if step:
                model.step()
            t = time.perf_counter()
            rec.record(step)
            times.append(time.perf_counter() - t)
        rec.close()
        end = time.perf_counter()
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path)
    raw = steps * n * 4
    return {
        "params": n, "writers": writers, "steps": steps, "chunk_steps": rec.plan.rows,
        "segments": len(rec.plan.segments), "budget": host_memory,
        "growth": meter.peak - before, "record_ms": statistics.median(times) * 1e3,
        "gbps": raw / (end - first) / 1e9, "setup_s": first - start,
        "stored_over_raw": stored / raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M,100M,500M")
    parser.add_argument("--host-memory", default="1GiB")
    parser.add_argument("--writers", default="1,2")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    budget = parse_bytes(args.host_memory)
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; host_memory {budget / MiB:.0f} MiB")
    results = []
    try:
        disk = None if args.no_baselines else disk_speed(workdir)
        if disk:
            print(f"disk write speed (16 MiB files, no fsync): {disk:.3f} GB/s")
        for text in args.sizes.split(","):
            n = _size(text)
            codec = None if args.no_baselines else codec_speed(_Synthetic(min(n, 1 << 21)))
            if codec:
                print(f"\n{text}: codec speed (one core, transpose + LZ4): {codec:.3f} GB/s")
            for w in (int(x) for x in args.writers.split(",")):
                r = record_run(n, writers=w, host_memory=budget, workdir=workdir,
                               steps=args.steps)
                r.update(name=text, disk=disk, codec=codec)
                results.append(r)
                line = (f"  {w} writer(s): {r['steps']} steps, chunk_steps {r['chunk_steps']}, "
                        f"{r['segments']} segment(s)/row; peak growth "
                        f"{r['growth'] / MiB:.0f} MiB ({r['growth'] / budget:.0%} of budget); "
                        f"record {r['record_ms']:.1f} ms; {r['gbps']:.3f} GB/s; "
                        f"stored/raw {r['stored_over_raw']:.3f}")
                if codec and disk:
                    bound = min(w * codec, disk)
                    line += f"; {r['gbps'] / bound:.0%} of min(writers x codec, disk)"
                print(line, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
