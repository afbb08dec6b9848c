"""Two gloo processes train one DDP model with a Recorder; only rank 0 may write.

Usage: python ddp_record.py OUT.zarr   (prints rank0=<wrote> rank1=<wrote>)
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ckpt_tools


def worker(rank: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    wrote = False
    with ckpt_tools.Recorder(out, model, "0:11:2") as rec:
        rec.record(0)
        for step in range(1, 11):
            loss = model(torch.randn(4, 6, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            wrote |= rec.record(step, loss=loss.item())
    dist.barrier()
    if rank == 1:
        torch.save(model.module.state_dict(), Path(out).parent / "rank1_final.pt")
    print(f"rank{rank}={wrote}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = str(s.getsockname()[1])
    mp.spawn(worker, args=(sys.argv[1], free_port), nprocs=2, join=True)
