"""Recording a model whose parameters are sharded across ranks (FSDP2, DTensor).

Under ``torch.distributed.fsdp.fully_shard`` a parameter is a `DTensor` split along its
first dimension (`Shard(0)`, uneven when the dimension does not divide: `torch.chunk`'s
split, so trailing ranks may hold fewer rows or none). A rank's local shard of a
parameter is therefore one contiguous stretch of that parameter's part of the flat
`param` axis. `ShardedRows` finds those stretches on every rank (one `all_gather_object`
when recording starts), plans with `ckpt_tools.shard_plan` which rank writes which
storage chunks, and for each recorded row copies this rank's own pieces into its row and
swaps the pieces of shared chunks with the other ranks (one `all_to_all_single` of those
pieces only). No rank gathers the model.

Parameters that are not sharded (plain tensors left out of `fully_shard`, or replicated
DTensors) are held whole by every rank and written by the lowest rank that holds them;
buffers (BatchNorm statistics) are written by rank 0. Every collective here runs on the
default process group, from the training thread, at calls that every rank makes in the
same order (`Recorder` construction, `record`, `flush`, `close`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ckpt_tools.recording.budget import Piece as Columns
from ckpt_tools.recording.budget import Plan
from ckpt_tools.shard_plan import Piece, ShardPlan, plan_writes
from ckpt_tools.tensors import TensorSpec

__all__ = ["ShardedRows", "is_sharded", "model_class_name"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a `DTensor` in an initialised process group."""
    dtensor = _dtensor_type()
    if dtensor is None or not (dist.is_available() and dist.is_initialized()):
        return False
    return any(isinstance(p, dtensor) for p in model.parameters())


def model_class_name(model: nn.Module) -> str:
    """The model's own class name (`fully_shard` swaps in a generated ``FSDP<Name>``)."""
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch.distributed.fsdp"):
            return cls.__name__
    return type(model).__name__


def _local(tensor: torch.Tensor) -> torch.Tensor:
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def _held_stretch(spec: TensorSpec, tensor: torch.Tensor) -> tuple[int, int] | None:
    """The `(start, stop)` of `spec`'s stretch of the flat axis held here (None: none).

    Raises:
        ValueError: the tensor is sharded along another dimension than the first.
    """
    dtensor = _dtensor_type()
    if not isinstance(tensor, dtensor):
        return spec.offset, spec.stop
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    if not shape or spec.size == 0:  # a 0-d tensor cannot be split
        return spec.offset, spec.stop
    if tuple(shape[1:]) != spec.shape[1:] or any(offset[1:]):
        raise ValueError(f"parameter '{spec.name}' is sharded as {tensor.placements}: only "
                         "sharding along the first dimension (FSDP's Shard(0)) can be "
                         "recorded")
    if shape[0] == 0:
        return None
    row = spec.size // spec.shape[0]
    return spec.offset + offset[0] * row, spec.offset + (offset[0] + shape[0]) * row


def _claim(held: Sequence[Sequence[tuple[int, int, int]]]) -> list[list[Piece]]:
    """Give each stretch held by several ranks (replicas) to the lowest of them."""
    taken, pieces = set(), []
    for rank_held in held:
        mine = []
        for tensor, start, stop in rank_held:
            if (start, stop) not in taken:
                taken.add((start, stop))
                mine.append(Piece(tensor, start, stop))
        pieces.append(mine)
    return pieces


class ShardedRows:
    """This rank's share of writing the `params` rows of a sharded model.

    Args:
        specs: The model's parameter table (`ckpt_tools.tensors.param_specs`: global
            shapes, flat offsets).
        tensors: The model's parameters in the same order (DTensors or plain tensors).
        chunk: The storage chunk length along `param`.

    Attributes:
        rank, world: This process's rank and the number of ranks.
        plan: The `ShardPlan` of this rank.

    Collective: every rank constructs it at the same point.
    """

    def __init__(self, specs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor], chunk: int):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        held = []
        for i, (spec, tensor) in enumerate(zip(specs, tensors, strict=True)):
            stretch = _held_stretch(spec, tensor)
            if stretch is not None and stretch[1] > stretch[0]:
                held.append((i, *stretch))
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, held)
        pieces = _claim(everyone)
        size = sum(s.size for s in specs)
        self.plan: ShardPlan = plan_writes(pieces, size, chunk, self.rank)
        self._mine = {p.tensor for p in pieces[self.rank]}
        locals_ = [_local(t) for t in tensors]
        self.device = locals_[0].device if locals_ else torch.device("cpu")
        self.row = np.empty(self.plan.width, np.float32)  # this rank's columns of a row
        self.norms = np.full(len(tensors), np.nan, np.float32)
        self._at: dict[Columns, int] = {}

    def to_store(self, plan: Plan) -> Plan:
        """`plan` with its `params` pieces moved from this rank's row to store columns.

        `plan` was cut from a `params` width of `width` (this rank's columns end to end)
        at the storage unit: since every run in `columns` is whole units, each piece lies
        in one run.
        """
        starts = np.cumsum([0] + [hi - lo for lo, hi in self.columns])

        def move(piece: Columns) -> Columns:
            if piece.array != "params":
                return piece
            run = int(np.searchsorted(starts, piece.start, side="right")) - 1
            lo = self.columns[run][0] + piece.start - int(starts[run])
            moved = Columns("params", lo, lo + piece.width)
            self._at[moved] = piece.start
            return moved

        return dataclasses.replace(plan, segments=tuple(tuple(move(p) for p in seg)
                                                        for seg in plan.segments))

    def take(self, tensors: Sequence[torch.Tensor]) -> None:
        """Gather this step's `row` and `norms` (collective: every rank, every row)."""
        self.copy_row(tensors, self.row)
        self.norms[:] = self.grad_norms(tensors)

    def fill(self, piece: Columns, out: np.ndarray) -> None:
        """Copy `piece` (store columns of `params`, or of `grad_norm`) of the taken step."""
        if piece.array == "grad_norm":
            out[:] = self.norms[piece.start:piece.stop]
        else:
            at = self._at[piece]
            out[:] = self.row[at:at + piece.width]

    @property
    def columns(self) -> tuple[tuple[int, int], ...]:
        """The chunk-aligned `(start, stop)` runs of `param` that this rank writes."""
        return self.plan.columns

    @property
    def width(self) -> int:
        """Elements per row that this rank writes (the concatenated `columns`)."""
        return self.plan.width

    def copy_row(self, tensors: Sequence[torch.Tensor], out: np.ndarray) -> None:
        """Fill `out` (this rank's `width` float32 values) from the current parameters.

        Collective when the plan exchanges pieces: every rank calls it for the same row.
        """
        flat = [_local(t).detach().reshape(-1) for t in tensors]
        plan = self.plan
        on_host = self.device.type == "cpu"
        row = torch.from_numpy(out) if on_host else torch.empty(
            plan.width, dtype=torch.float32, device=self.device)
        for tensor, offset, at, n in plan.local:
            row[at : at + n].copy_(flat[tensor][offset : offset + n])
        if plan.exchange:
            parts = [flat[t][o : o + n].float() for dest in plan.send for t, o, n in dest]
            sent = torch.cat(parts) if parts else torch.empty(0, device=self.device)
            got = torch.empty(sum(plan.receive_sizes), dtype=torch.float32, device=self.device)
            dist.all_to_all_single(got, sent, plan.receive_sizes, plan.send_sizes)
            at_got = 0
            for source in plan.receive:
                for at, n in source:
                    row[at : at + n].copy_(got[at_got : at_got + n])
                    at_got += n
        if not on_host:
            torch.from_numpy(out).copy_(row)

    def grad_norms(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """`(n_tensors,)` L2 norm of each parameter's whole gradient, on every rank.

        NaN where the gradient is missing. Collective: one all-reduce of the squared
        norms of the local shards (each stretch counted once).
        """
        squares = torch.zeros(len(tensors), dtype=torch.float64, device=self.device)
        present = [i for i, t in enumerate(tensors) if i in self._mine and t.grad is not None]
        missing = [i for i, t in enumerate(tensors) if i in self._mine and t.grad is None]
        if present:
            norms = torch._foreach_norm([_local(tensors[i].grad).detach() for i in present])
            squares[present] = torch.stack(norms).double().square()
        squares[missing] = float("nan")
        dist.all_reduce(squares)
        return squares.sqrt().float().cpu().numpy()
