"""What a resume point costs: copy time on the training thread, write time, bytes on disk.

    python bench/resume_cost.py [--model resnet20] [--repeats 20]

Builds the model on the embedded digits, takes a few SGD steps (so momentum exists),
then times `resume.capture` (paid by the training loop) and
`HistoryWriter.save_resume_point` (paid by the background writer), and reports the
resume state's size in checkpoints' worth of raw float32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ckpt_tools import batches
from ckpt_tools.resume import capture
from ckpt_tools.store import HistoryWriter
from ckpt_tools.tensors import buffer_specs, param_specs
from ckpt_tools.train import TrainConfig, build


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    config = TrainConfig(model=args.model)
    model, data = build(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(1, 4):
        x, y = batches.batch_for_step(data, step, batch_size=config.batch_size, seed=0)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.zarr"
        writer = HistoryWriter.create(
            path, "train", steps=range(2), params=param_specs(model),
            buffers=buffer_specs(model), attrs={}, root_attrs={},
        )
        copies, writes = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            point = capture(3, model, opt)
            t1 = time.perf_counter()
            writer.save_resume_point(point)
            copies.append(t1 - t0)
            writes.append(time.perf_counter() - t1)
        slots = sum(_du(path / "train" / n) for n in
                    ("resume_params", "resume_buffers", "resume_momentum", "resume_rng"))
        writer.close()
    n = sum(p.numel() for p in model.parameters())
    raw = (n + sum(s.size for s in buffer_specs(model))) * 4
    copy_ms, write_ms = statistics.median(copies) * 1e3, statistics.median(writes) * 1e3
    print(f"{args.model}: {n:,} parameters")
    print(f"capture (training thread): median {copy_ms:.2f} ms")
    print(f"write + pointer switch + consolidate (writer thread): median {write_ms:.1f} ms")
    print(f"resume state on disk (2 slots, compressed): {slots / 1024:.0f} KiB = "
          f"{slots / raw:.1f} checkpoints' raw float32 ({raw / 1024:.0f} KiB each)")
    print(f"training-thread cost at the default 30 s interval: {copy_ms / 30e3 * 100:.4f}%")


if __name__ == "__main__":
    main()
