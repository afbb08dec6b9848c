"""Telemetry speed against the decode limit and the per-step torch.load baseline.

Writes a synthetic history of about --gb GB of raw float32 weights with the store writer
(the layer table of a real model: ResNet-20 for CIFAR-10 by default, 272,474 weights in
65 tensors; weights on a seeded random walk, so they compress and flip sign like
recorded ones), and measures in the same run, in raw float32 GB per second:

  decode limit
    (a) TensorStore reading the whole ``params`` array (C++, all cores), in slabs of
        about 1 GB so a large history need not fit in memory;
    (b) the codec alone: blosc decompressing the stored chunks (bytes already in
        memory), one thread per core, into reused buffers;
    (c) the store's chunk reader: every chunk read and decoded, nothing else;
  (d) fused telemetry (`ckpt_tools.analyses.telemetry.compute`, every variable), on the
      CPU, and on CUDA when a GPU is present;
  (e) the baseline: one ``torch.save`` file per step, loaded one by one with
      ``torch.load(weights_only=True)``, the same per-layer metrics in torch, on the
      first --baseline-gb GB of steps (its cost is per step; 1 and all torch threads).

With --cold, the store's files are dropped from the page cache (posix_fadvise) before
each store pass, so they come from the disk.

With --store, an existing history (e.g. one written for bench/telemetry_memory.py) is
measured instead of a new one: its first --gb GB of steps (its own layer table).

Usage: python bench/telemetry_speed.py [--gb 1.0] [--cold] [--profile] [--json OUT]
       python bench/telemetry_speed.py --store BIG.zarr --gb 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from numcodecs import blosc

import ckpt_tools
from ckpt_tools import models
from ckpt_tools.analyses import telemetry
from ckpt_tools.store import history_meta, open_chunks
from ckpt_tools.synthetic import write_synthetic_history
from ckpt_tools.tensors import param_specs, specs_from_json, split_row


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def evict(folder: Path) -> None:
    """Drop the files under `folder` from the page cache."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_torch_files(history, folder: Path, specs, n_steps: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    params = history["params"]
    for lo in range(0, n_steps, 16):
        rows = np.asarray(params[lo:min(lo + 16, n_steps)].values)
        for r, row in enumerate(rows):
            torch.save(split_row(row, specs), folder / f"step{lo + r:06d}.pt")


def baseline(folder: Path, steps, prunable) -> list:
    """The obvious loop: load each step's file, compute the telemetry per layer in torch."""
    load = lambda s: torch.load(folder / f"step{s:06d}.pt", weights_only=True)  # noqa: E731
    w0, wf, prev = load(steps[0]), load(steps[-1]), None
    out = []
    for s in steps:
        sd = load(s)
        row = {}
        for name in prunable:
            w, a, b = sd[name], w0[name], wf[name]
            row[name] = [
                (torch.sign(w) * torch.sign(a) < 0).sum().item(), w.abs().sum().item(),
                torch.dist(w, a).item(), torch.dist(w, b).item(),
                torch.nn.functional.cosine_similarity(w.flatten(), a.flatten(), 0).item(),
                torch.nn.functional.cosine_similarity(w.flatten(), b.flatten(), 0).item(),
            ]
            if prev is not None:
                p = prev[name]
                row[name] += [(torch.sign(w) * torch.sign(p) < 0).sum().item(),
                              torch.dist(w, p).item()]
        out.append(row)
        prev = sd
    return out


def tensorstore_read(array_path: Path, slab_rows: int, n_rows: int) -> int:
    """Read the first `n_rows` of the array with TensorStore, slab by slab; returns bytes."""
    import tensorstore as ts

    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                    "path": str(array_path)}}).result()
    n = 0
    for lo in range(0, n_rows, slab_rows):
        n += store[lo:min(lo + slab_rows, n_rows)].read().result().nbytes
    return n


def codec_decode(files: list[Path], threads: int, limit: int) -> tuple[float, int]:
    """Seconds to blosc-decompress the chunks of `files` (up to `limit` raw bytes)."""
    data, raw = [], 0
    for f in files:
        if raw >= limit:
            break
        data.append(f.read_bytes())
        raw += blosc._cbuffer_sizes(data[-1])[0]
    size = max(blosc._cbuffer_sizes(d)[0] for d in data)
    buffers = [np.empty(size, np.uint8) for _ in range(threads)]

    def work(part):
        out = buffers[part]
        for d in data[part::threads]:
            blosc.decompress(d, out[:blosc._cbuffer_sizes(d)[0]])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))  # warm
        t, _ = timed(lambda: list(pool.map(work, range(threads))))
    return t, raw


def profile(store: Path) -> dict:
    """One thread: GB/s reading+decoding chunks, and reducing them (the kernel)."""
    from ckpt_tools.analyses._kernel import chunk_sums

    reader = open_chunks(store)
    t_read = t_kernel = 0.0
    nbytes = 0
    for i in range(min(reader.grid()[0], 24)):
        for j in range(reader.grid()[1]):
            t, x = timed(lambda i=i, j=j: reader.read(i, j))
            t_read += t
            xt = x.T
            cuts = np.array([0], np.int64)
            floats = np.empty((7, xt.shape[1], 1))
            counts = np.empty((2, xt.shape[1], 1), np.int64)
            w0, wf = np.zeros(xt.shape[0], np.float32), np.zeros(xt.shape[0], np.float32)
            t, _ = timed(lambda xt=xt, f=floats, c=counts, cuts=cuts, w0=w0, wf=wf: chunk_sums(
                xt, w0, wf, cuts, f, c, w0, wf))
            t_kernel += t
            nbytes += x.nbytes
    return {"read+decode, 1 thread": nbytes / t_read, "kernel, 1 thread": nbytes / t_kernel}


class _Figures(dict):
    """Figures, each printed as soon as it is measured."""

    def __setitem__(self, name, rate):
        super().__setitem__(name, rate)
        print(f"{name:40s} {rate / 1e9:7.3f} GB/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="raw float32 GB of weights")
    parser.add_argument("--baseline-gb", type=float, default=0.2,
                        help="GB of steps the torch.load baseline is timed on")
    parser.add_argument("--model", default="resnet20", help="built-in model whose layers to use")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--cold", action="store_true", help="evict the store before each pass")
    parser.add_argument("--profile", action="store_true", help="time decoding and the kernel")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--store", type=Path, default=None, help="measure this store's first "
                        "--gb GB instead of writing one")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, scratch: Path) -> None:
    if args.store is None:
        model = models.build(args.model, num_classes=10, in_channels=3, image_size=32)
        specs = param_specs(model)
        width = specs[-1].stop
        n_steps = max(int(args.gb * 1e9 / (4 * width)), 2)
        store = scratch / "synthetic.zarr"
        t_write, _ = timed(lambda: write_synthetic_history(store, n_steps=n_steps, specs=specs))
    else:
        store, t_write = args.store, 0.0
        specs = specs_from_json(history_meta(store)["params"])
        width = specs[-1].stop
        n_steps = max(int(args.gb * 1e9 / (4 * width)) // 16 * 16, 2)
    history = ckpt_tools.open_history(store).isel(step=slice(0, n_steps))
    n_steps = history.sizes["step"]
    raw = history["params"].nbytes
    n_base = min(n_steps, max(int(args.baseline_gb * 1e9 / (4 * width)), 2))
    t_files, _ = timed(lambda: write_torch_files(history, scratch / "pt", specs, n_base))
    array = store / "train" / "params"
    stored = sorted((p for p in array.rglob("c/*/*") if p.is_file()),
                    key=lambda p: int(p.parent.name))[:-(-n_steps // 16) * -(-width // 2**18)]
    stored_bytes = sum(f.stat().st_size for f in stored)
    cores = os.cpu_count() or 1
    print(f"history: {n_steps} steps x {width:,} weights = {raw / 1e9:.2f} GB raw float32, "
          f"{stored_bytes / 1e9:.2f} GB stored; written in {t_write:.0f} s; "
          f"{cores} cores; load average {os.getloadavg()[0]:.1f}")

    def store_pass(fn):
        if args.cold:
            evict(store)
        return timed(fn)

    figures = _Figures()
    slab = max(16, int(1e9 / (4 * width)) // 16 * 16)
    t, n = store_pass(lambda: tensorstore_read(array, slab, n_steps))
    figures["TensorStore full read"] = n / t
    t, n = codec_decode(stored, cores, min(raw, int(2e9)))
    figures[f"blosc decode ({cores} threads)"] = n / t
    data = history["params"].data
    t, _ = store_pass(lambda: data.map_blocks(lambda b: np.zeros((1, 1)),
                                              chunks=(1, 1)).compute())
    figures["chunk reader: read + decode"] = raw / t
    t, result = store_pass(lambda: telemetry.compute(history))
    figures["fused telemetry (cpu)"] = raw / t
    if torch.cuda.is_available():
        telemetry.compute(history.isel(step=slice(0, 32)), device="cuda")  # warm
        t, on_gpu = store_pass(lambda: telemetry.compute(history, device="cuda"))
        figures["fused telemetry (cuda reduce)"] = raw / t
        assert np.allclose(on_gpu["l2_to_init"], result["l2_to_init"], rtol=1e-12)
    steps = history["step"].values[:n_base].tolist()
    prunable = [s.name for s in specs if s.prunable]
    base_raw = n_base * width * 4
    threads = torch.get_num_threads()
    best = 0.0
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        t, _ = timed(lambda: baseline(scratch / "pt", steps, prunable))
        figures[f"torch.load baseline ({n} thread{'s' if n > 1 else ''})"] = base_raw / t
        best = max(best, base_raw / t)
    torch.set_num_threads(threads)
    if args.profile:
        for name, rate in profile(store).items():
            figures[f"profile: {name}"] = rate

    tel = figures["fused telemetry (cpu)"]
    ratios = {
        "telemetry / baseline (target >= 10)": tel / best,
        "telemetry / TensorStore read (target >= 0.8)": tel / figures["TensorStore full read"],
        "telemetry GB/s (target >= 1)": tel / 1e9,
    }
    for name, value in ratios.items():
        print(f"{name:48s} {value:7.2f}")
    assert result.sizes["step"] == n_steps
    if args.json:
        args.json.write_text(json.dumps({
            "raw_bytes": raw, "stored_bytes": stored_bytes, "steps": n_steps,
            "weights": width, "cold": args.cold, "load": os.getloadavg(),
            "GB/s": {k: v / 1e9 for k, v in figures.items()}, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
