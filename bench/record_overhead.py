"""Recording overhead: a training loop that records every step vs the same loop without
recording vs the same loop calling `torch.save(model.state_dict())` every step.

Usage::

    python bench/record_overhead.py [--steps 200] [--repeats 3]
        [--cases default,convnet25k,resnet20-32] [--codec none] [--writers N]

Cases:
    default      the embedded default: ResNet-20 on the 8x8 digits, batch 128.
    convnet25k   the built-in conv net at width 16 (24,058 parameters) on the digits.
    resnet20-32  ResNet-20 at 32x32x3, batch 128 (synthetic images: only compute matters).

``--codec``, ``--writers`` and ``--host-memory`` are passed to the `Recorder`.

The three variants of a case run interleaved (A B C, A B C, ...) so that drift of a
shared machine hits all of them alike; each figure is the median over repeats, and every
ratio is against the no-recording baseline measured in the same run. The wall time of
a recorded loop includes `Recorder.close()` (everything flushed to disk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ckpt_tools
from ckpt_tools import batches
from ckpt_tools.train import TrainConfig, build


def _case(name: str):
    if name == "default":
        model, data = build(TrainConfig())

        def batch(step):
            return batches.batch_for_step(data, step, batch_size=128, seed=0)

        return model, batch
    if name == "convnet25k":
        model, data = build(TrainConfig(model="convnet", width=16))

        def batch(step):
            return batches.batch_for_step(data, step, batch_size=128, seed=0)

        return model, batch
    if name == "resnet20-32":
        from ckpt_tools import models

        torch.manual_seed(0)
        model = models.build("resnet20", num_classes=10, in_channels=3, image_size=32)
        gen = torch.Generator().manual_seed(0)
        pool = [(torch.randn(128, 3, 32, 32, generator=gen), torch.randint(0, 10, (128,),
                 generator=gen)) for _ in range(4)]
        return model, lambda step: pool[step % len(pool)]
    raise SystemExit(f"unknown case {name!r}: use default, convnet25k or resnet20-32")


def _loop(case: str, steps: int, mode: str, workdir: Path, options: dict) -> float:
    model, batch = _case(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    rec = None
    if mode == "record":
        rec = ckpt_tools.Recorder(workdir / f"{case}.zarr", model, f"0:{steps + 1}:1",
                                  optimizer=opt, overwrite=True, **options)
        rec.record(0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        if rec is not None:
            rec.record(step, loss=value)
        elif mode == "torch.save":
            torch.save(model.state_dict(), workdir / f"step_{step:06d}.pt")
    if rec is not None:
        rec.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="default,convnet25k,resnet20-32")
    parser.add_argument("--codec", default=None)
    parser.add_argument("--writers", type=int, default=None)
    parser.add_argument("--host-memory", default=None)
    args = parser.parse_args()
    options = {k: v for k, v in (("codec", args.codec), ("writers", args.writers),
                                 ("host_memory", args.host_memory)) if v is not None}
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps, median of {args.repeats}; recorder options {options}; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    for case in args.cases.split(","):
        times = {"baseline": [], "record": [], "torch.save": []}
        _loop(case, 5, "baseline", Path(tempfile.gettempdir()), options)  # warm up
        for _ in range(args.repeats):
            for mode in times:
                with tempfile.TemporaryDirectory() as tmp:
                    times[mode].append(_loop(case, args.steps, mode, Path(tmp), options))
        base = statistics.median(times["baseline"])
        rec = statistics.median(times["record"])
        save = statistics.median(times["torch.save"])
        per_step = {k: statistics.median(v) / args.steps * 1e3 for k, v in times.items()}
        print(f"\n{case}: ms per step " + ", ".join(f"{k} {v:.2f}" for k, v in per_step.items()))
        print(f"  recording every step adds  {rec / base - 1:+.1%} to the loop's wall time")
        print(f"  torch.save every step adds {save / base - 1:+.1%}")
        extra_rec, extra_save = rec - base, save - base
        if extra_rec > 0:
            ratio = extra_save / extra_rec
            print(f"  torch.save's added time / recording's added time = {ratio:.1f}x")
        else:
            print("  recording added no measurable time")
        print("  raw: " + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v)
                                    for k, v in times.items()))


if __name__ == "__main__":
    main()
