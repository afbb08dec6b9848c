"""FSDP recording overhead: 2 gloo ranks on the CPU train a `fully_shard` MLP with and
without a Recorder that records every step.

Usage::

    python bench/fsdp_record.py [--width 1024] [--layers 6] [--steps 48] [--repeats 2]
                                [--codec lz4|none]

The model is `--layers` Linear layers of `--width` x `--width` (weights and biases; the
biases shift every tensor off the 2**18-element chunk grid, so chunks at shard
boundaries are shared and their pieces travel between ranks). Each rank trains on its
own batches of 64 with one torch thread. The two variants run interleaved (A B, A B,
...) so that drift of a shared machine hits both alike; each figure is rank 0's median
over repeats, and the ratio is against the unrecorded loop measured in the same run.
A recorded loop's wall time includes `Recorder.close()` (everything committed). Also
printed: what one row costs on the training thread (`record`, median), and how many
elements of a row each rank writes and sends to the other.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

import ckpt_tools


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width),
                                                                nn.Tanh())])
    for layer in model[::2]:
        fully_shard(layer)
    return fully_shard(model)


def _loop(args, rank: int, record: bool, out: Path) -> tuple[float, list[float], dict]:
    model = _model(args.width, args.layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    data = [torch.randn(64, args.width, generator=gen) for _ in range(4)]
    rec = (ckpt_tools.Recorder(out, model, f"0:{args.steps + 1}:1", overwrite=True,
                               codec=args.codec) if record else None)
    calls, info = [], {}
    dist.barrier()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(data[step % len(data)]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rec is not None:
            t = time.perf_counter()
            rec.record(step)
            calls.append(time.perf_counter() - t)
    if rec is not None:
        rec.close()
        plan = rec._sharded.plan
        info = {"writes": plan.width, "sends": sum(plan.send_sizes)}
    dist.barrier()
    return time.perf_counter() - start, calls, info


def _worker(rank: int, args, port: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    plain, recorded, calls, infos = [], [], [], []
    for repeat in range(args.repeats):
        plain.append(_loop(args, rank, False, Path(folder) / "x.zarr")[0])
        wall, c, info = _loop(args, rank, True, Path(folder) / f"r{repeat}.zarr")
        recorded.append(wall)
        calls += c
        infos.append(info)
    everyone: list = [None, None]
    dist.all_gather_object(everyone, infos[-1])
    if rank == 0:
        n = sum(p.numel() for p in _model(args.width, args.layers).parameters())
        base, rec = statistics.median(plain), statistics.median(recorded)
        print(f"model: {args.layers} x Linear({args.width}, {args.width}), {n:,} parameters "
              f"({n * 4 / 2**20:.1f} MiB per checkpoint), 2 FSDP ranks (gloo, CPU), "
              f"{args.steps} steps x {args.repeats} repeats, codec {args.codec}")
        for r, info in enumerate(everyone):
            print(f"rank {r}: writes {info['writes']:,} elements of each row "
                  f"({info['writes'] / n:.1%}), sends {info['sends']:,} to the other rank "
                  f"({info['sends'] / n:.2%})")
        print(f"unrecorded: {base / args.steps * 1e3:.1f} ms/step; recorded every step: "
              f"{rec / args.steps * 1e3:.1f} ms/step; overhead {rec / base - 1:+.1%}")
        print(f"record() on the training thread (rank 0): median "
              f"{statistics.median(calls) * 1e3:.2f} ms, max {max(calls) * 1e3:.1f} ms")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--codec", choices=("lz4", "none"), default="lz4")
    args = parser.parse_args()
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(args, port, folder), nprocs=2, join=True,
                           start_method="fork")


if __name__ == "__main__":
    main()
