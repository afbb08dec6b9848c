"""Gloo processes train FSDP2 (`fully_shard`) models with a Recorder on the CPU.

Usage: python fsdp_record.py DIR --world N JOB [JOB ...]

A JOB is ``NAME:MODEL:CHUNK[:stop=K|:resume]``: record MODEL (``bn``, ``unsharded``, or
``plain``: the ``bn`` model neither sharded nor wrapped, each rank training on its own)
into ``DIR/NAME.zarr`` with storage chunks of CHUNK elements along `param` and no Zarr
sharding (0: the default layout; a few elements make a tiny model span many chunks,
interleaved across ranks as a large model's are at the default). ``stop=K`` ends every rank abruptly
(``os._exit``, no close) once step K is flushed, as a killed job would, so it must be the
last job; ``resume`` continues such a run from its last stored step.

At every recorded step the reference is taken independently with
`get_model_state_dict(..., full_state_dict=True)` and saved by rank 0 as
``DIR/NAME.reference.pt`` ({step: state dict}, with each parameter's whole-gradient
norm under ``grad_norm``, gathered with ``full_tensor``; ``NAME.reference-resumed.pt``
for a resumed job). Prints ``NAME.rank<r>=<n>,<recorded>``: how many `param` elements
of a row rank r writes, and whether its `record` calls returned True.
"""

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

import ckpt_tools
import ckpt_tools.resume
from ckpt_tools.store import layout

STEPS = 6


def build(kind: str) -> nn.Module:
    """Dimensions 7, 3 and 2 do not divide by 2 or 3: shards are uneven, some empty."""
    torch.manual_seed(0)
    if kind == "plain":
        return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3),
                             nn.Linear(3, 2))
    if kind == "bn":  # BatchNorm: buffers (running stats, an int64 counter)
        model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3),
                              nn.Linear(3, 2))
        for layer in (model[0], model[3], model[4]):
            fully_shard(layer)
        fully_shard(model)
        return model
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model.register_parameter("scale", nn.Parameter(torch.linspace(0.5, 1.5, 3)))
    fully_shard(model[0])
    fully_shard(model, ignored_params={model.scale})  # `scale` stays a plain tensor
    return model


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out * model.scale if hasattr(model, "scale") else out


def full_state(model: nn.Module) -> dict:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    return {k: v.clone() for k, v in state.items()}  # buffers come back as the live tensors


def grad_norms(model: nn.Module) -> torch.Tensor:
    norms = []
    for p in model.parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        norms.append(grad.norm() if grad is not None else torch.tensor(float("nan")))
    return torch.stack(norms)


def run(rank: int, folder: str, job: str) -> None:
    name, kind, chunk, *mode = job.split(":")
    out = os.path.join(folder, f"{name}.zarr")
    # A few elements per chunk and no Zarr sharding: each chunk is a unit of writing.
    layout.PARAM_CHUNK = int(chunk) or (1 << 18)
    layout.SHARD_AFTER = (1 << 30) if int(chunk) else 4
    model = build(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    resume = mode == ["resume"]
    stop = int(mode[0].removeprefix("stop=")) if mode and not resume else None
    first = 0
    if resume:
        first = int(ckpt_tools.open_history(out).step.values[-1])
        state = ckpt_tools.load_state_dict(out, first) if rank == 0 else {}
        set_model_state_dict(model, state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
    reference = {}
    rec = ckpt_tools.Recorder(out, model, f"0:{STEPS + 1}:1", config={"model": kind},
                              resume=resume)
    width = sum(hi - lo for lo, hi in rec.param_columns)
    recorded = False
    for step in range(first + resume, STEPS + 1):
        loss = None
        if step > 0:
            gen = torch.Generator().manual_seed(1000 * step + rank)
            loss = forward(model, torch.randn(8, 5, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            if hasattr(model, "scale"):  # replicated: average its gradient as DDP would
                dist.all_reduce(model.scale.grad, op=dist.ReduceOp.AVG)
            opt.step()
        norms = grad_norms(model) if step > 0 else None
        recorded |= rec.record(step, **({"loss": loss.item()} if loss is not None else {}))
        reference[step] = full_state(model)
        if norms is not None:
            reference[step]["grad_norm"] = norms
        if step == stop:
            rec.flush()
            break
    if rank == 0:
        suffix = "-resumed" if resume else ""
        torch.save(reference, os.path.join(folder, f"{name}.reference{suffix}.pt"))
    if rank == 0 and kind != "plain":  # resume points hold the whole model: refused
        try:
            ckpt_tools.resume.capture(STEPS, model, opt)
        except ValueError as exc:
            print(f"{name}.capture=refused: {exc}", flush=True)
    print(f"{name}.rank{rank}={width},{recorded}", flush=True)
    if stop is not None:
        dist.barrier()
        os._exit(0)
    rec.close()


def worker(rank: int, args, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.set_num_threads(1)
    for job in args.jobs:
        run(rank, args.dir, job)
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("jobs", nargs="+")
    cli = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = str(s.getsockname()[1])
    # fork: the ranks share the parent's imports instead of importing torch again each.
    mp.start_processes(worker, args=(cli, free_port), nprocs=cli.world, join=True,
                       start_method="fork")
