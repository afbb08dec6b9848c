"""Telemetry speed: the fused pass over a store vs one torch.save file per step.

Writes a synthetic history of about --gb GB of raw float32 weights, with the layer table
of a real model (ResNet-20 for CIFAR-10 by default: 272,474 weights in 65 tensors), with
the store writer and the same weights as one ``torch.save`` file per
step, then measures, in one run, raw GB processed per second for:

  (a) fused telemetry over the store (`ckpt_tools.analyses.telemetry.compute`);
  (b) the obvious baseline: each step's file loaded one by one with
      ``torch.load(weights_only=True)``, the same metrics per layer in torch;
  (c) single-pass reads of the same bytes: every chunk read and decompressed once by
      zarr on the same dask threads, doing nothing else; and the stored files' bytes
      read from the file system (warm page cache, like everything here).

Usage: python bench/telemetry_speed.py [--gb 1.0] [--model resnet20] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ckpt_tools.analyses import telemetry

import ckpt_tools
from ckpt_tools import models
from ckpt_tools.synthetic import write_synthetic_history
from ckpt_tools.tensors import param_specs, split_row


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def write_torch_files(history, folder: Path, specs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    params = history["params"]
    for lo in range(0, history.sizes["step"], 16):
        rows = np.asarray(params[lo:lo + 16].values)
        for r, row in enumerate(rows):
            torch.save(split_row(row, specs), folder / f"step{lo + r:06d}.pt")


def baseline(folder: Path, steps, prunable) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="raw float32 GB of weights")
    parser.add_argument("--model", default="resnet20", help="built-in model whose layers to use")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, scratch: Path) -> None:
    model = models.build(args.model, num_classes=10, in_channels=3, image_size=32)
    specs = param_specs(model)
    width = specs[-1].stop
    n_steps = max(int(args.gb * 1e9 / (4 * width)), 2)
    store = scratch / "synthetic.zarr"
    t_write, _ = timed(lambda: write_synthetic_history(store, n_steps=n_steps, specs=specs))
    history = ckpt_tools.open_history(store)
    raw = history["params"].nbytes
    t_files, _ = timed(lambda: write_torch_files(history, scratch / "pt", specs))
    stored = sorted((store / "train" / "params").rglob("c/*/*"))
    stored_bytes = sum(f.stat().st_size for f in stored)
    print(f"history: {n_steps} steps x {width:,} weights = {raw / 1e9:.2f} GB raw float32, "
          f"{stored_bytes / 1e9:.2f} GB stored; written in {t_write:.0f} s "
          f"(torch files: {t_files:.0f} s)")

    figures = {}
    t, _ = timed(lambda: [f.read_bytes() for f in stored])
    figures["file read (stored bytes)"] = raw / t
    data = history["params"].data
    t, _ = timed(lambda: data.map_blocks(lambda b: np.zeros((1, 1)), chunks=(1, 1)).compute())
    figures["zarr read + decompress"] = raw / t
    t, result = timed(lambda: telemetry.compute(history))
    figures["fused telemetry"] = raw / t
    steps = history["step"].values.tolist()
    prunable = [s.name for s in specs if s.prunable]
    threads = torch.get_num_threads()
    best = np.inf
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        t, _ = timed(lambda: baseline(scratch / "pt", steps, prunable))
        best = min(best, t)
        figures[f"torch.load baseline ({n} thread{'s' if n > 1 else ''})"] = raw / t
    torch.set_num_threads(threads)
    baseline_rate = raw / best

    for name, rate in figures.items():
        print(f"{name:34s} {rate / 1e9:7.3f} GB/s")
    tel, read = figures["fused telemetry"], figures["zarr read + decompress"]
    print(f"telemetry / baseline (best)        {tel / baseline_rate:7.1f} x")
    print(f"telemetry / zarr single-pass read  {tel / read:7.2f}")
    print(f"telemetry / file read              {tel / figures['file read (stored bytes)']:7.2f}")
    assert result.sizes["step"] == n_steps
    if args.json:
        args.json.write_text(json.dumps({"raw_bytes": raw, "stored_bytes": stored_bytes,
                                         "steps": n_steps, "weights": width,
                                         "GB/s": {k: v / 1e9 for k, v in figures.items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
