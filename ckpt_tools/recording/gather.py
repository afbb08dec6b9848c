"""Copying a model's named tensors into rows of the flat layout (the training thread's part).

A row is three store arrays side by side: `params` (every selected parameter, flattened
and concatenated), `buffers` (the same for buffers) and `grad_norm` (one L2 norm per
parameter tensor). `Gather.begin` takes the model's current tensors and their gradient
norms; `Gather.fill` copies one piece (a column range of one array) into a shared-memory
row; `Gather.copied` says when the copies so far have landed; `Gather.end` closes the step.

On the CPU a piece is one `np.concatenate` over cached numpy views of the tensors. On
CUDA, `begin` computes the gradient norms and a snapshot of the (small) buffers on the
training stream and records an event; `fill` queues non-blocking copies into the pinned
shared memory on a side stream that waits for that event; `copied` records the event that
says the copies have landed. The training stream is never synchronised with the host: it
only waits, on the device, for the copies before the next optimizer step rewrites the
weights (or at once, when no optimizer was given).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ckpt_tools.optim_state import ARRAY_PREFIX, state_tensors
from ckpt_tools.recording.budget import Piece
from ckpt_tools.tensors import TensorSpec

__all__ = ["Gather"]

_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool}


def _parts(specs: Sequence[TensorSpec], piece: Piece) -> list[tuple[int, int, int]]:
    """(tensor index, first, stop) of every tensor slice that lies in `piece`."""
    out = []
    for k, spec in enumerate(specs):
        lo, hi = max(spec.offset, piece.start), min(spec.stop, piece.stop)
        if lo < hi:
            out.append((k, lo - spec.offset, hi - spec.offset))
    return out


class Gather:
    """Copies the selected tensors of `model` into rows, piece by piece.

    Args:
        model: The (unwrapped) model.
        params: The recorded parameters' table (offsets along `params`).
        buffers: The recorded buffers' table (offsets along `buffers`).
        pieces: Every piece the rows are cut into.
        optimizer: On CUDA, the next `step` of this optimizer waits for the copies.
        optimizer_state: Entries of `optimizer`'s per-parameter state to copy too, each
            into the array ``optim_<entry>`` laid out like `params` (NaN where none).
    """

    def __init__(self, model: nn.Module, params: Sequence[TensorSpec],
                 buffers: Sequence[TensorSpec], pieces: Sequence[Piece],
                 optimizer: torch.optim.Optimizer | None = None,
                 optimizer_state: Sequence[str] = ()):
        self._sources = {
            kind: [(model.get_submodule(s.name.rpartition(".")[0]), s.name.rpartition(".")[2])
                   for s in specs]
            for kind, specs in (("params", params), ("buffers", buffers))
        }
        self._optimizer, self._states = optimizer, tuple(optimizer_state)
        self._nan: dict[int, torch.Tensor] = {}  # stand-ins for state not made yet
        specs = {"params": params, "buffers": buffers,
                 **{ARRAY_PREFIX + name: params for name in self._states}}
        self._parts = {p: _parts(specs[p.array], p) for p in pieces if p.array in specs}
        self._views: dict[str, tuple] = {}
        self._tensors: dict[str, list[torch.Tensor]] = {}
        self._norms = None
        self._cuda = None  # (side stream, ready event) while a CUDA step is open
        self._done = None
        self._hook = optimizer.register_step_pre_hook(self._wait_copies) if optimizer else None

    # -- per step --------------------------------------------------------------------
    def begin(self, grad_norm: Sequence[float] | None = None) -> None:
        """Take the model's current tensors and compute their gradient norms.

        `grad_norm` gives the norms instead (one per parameter tensor), for callers that
        measured them before the gradients were cleared.
        """
        self._tensors = {kind: [getattr(m, a) for m, a in src]
                         for kind, src in self._sources.items()}
        params = self._tensors["params"]
        missing: set[int] = set()
        for name in self._states:
            found = state_tensors(self._optimizer, params, name)
            missing.update(id(p) for t, p in zip(found, params, strict=True) if t is None)
            self._tensors[ARRAY_PREFIX + name] = [
                t if t is not None else self._stand_in(p) for t, p in zip(found, params,
                                                                           strict=True)]
        for key in set(self._nan) - missing:  # the optimizer has made that state now
            del self._nan[key]
        grads = [t.grad for t in params]
        present = [k for k, g in enumerate(grads) if g is not None]
        device = params[0].device if params else torch.device("cpu")
        with torch.no_grad():
            if grad_norm is not None:
                norms = torch.as_tensor(np.asarray(grad_norm, np.float32), device=device)
            else:
                norms = self._grad_norms(grads, present, device)
        if device.type != "cuda":
            self._norms = norms.numpy()
            self._cuda = None
            return
        side = self._side_stream(device)
        with torch.no_grad():
            buffers = self._tensors["buffers"]
            # Buffers change in the next forward pass (BatchNorm statistics): copy them
            # on the device now; they are small.
            if buffers:
                snap = torch.cat([b.detach().reshape(-1).float() for b in buffers])
                snap.record_stream(side)
                self._tensors["buffers"] = [snap]
        norms.record_stream(side)
        self._norms = norms
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
        side.wait_event(ready)
        self._cuda = side

    @staticmethod
    def _grad_norms(grads, present, device) -> torch.Tensor:
        # float32 L2 norms, NaN where a tensor has no gradient; no host synchronisation.
        if not present:
            return torch.full((len(grads),), float("nan"), device=device)
        values = [v.float() for v in torch._foreach_norm([grads[k] for k in present])]
        if len(present) == len(grads):
            return torch.stack(values)
        nan = torch.full((1,), float("nan"), device=device)
        found = dict(zip(present, values, strict=True))
        return torch.stack([found.get(k, nan[0]) for k in range(len(grads))])

    def _stand_in(self, p: torch.Tensor) -> torch.Tensor:
        # NaN of the parameter's shape, kept while its state is missing, so the cached
        # views of the previous step stay valid.
        if id(p) not in self._nan:
            self._nan[id(p)] = torch.full(p.shape, float("nan"), device=p.device)
        return self._nan[id(p)]

    def fill(self, piece: Piece, out: np.ndarray) -> None:
        """Copy `piece` of the current step into `out` (a float32 row of its width)."""
        if self._cuda is not None:
            self._fill_cuda(piece, out)
        elif piece.array == "grad_norm":
            out[:] = self._norms[piece.start:piece.stop]
        else:
            self._fill_host(piece, out)

    def copied(self):
        """A CUDA event that completes when the copies queued so far have landed (or None)."""
        if self._cuda is None:
            return None
        done = torch.cuda.Event()
        done.record(self._cuda)
        self._done = done
        return done

    def end(self) -> None:
        """Close the step (on CUDA, order the next weight update after its copies)."""
        if self._cuda is None:
            return
        self._cuda = None
        if self._hook is None:  # nothing tells us when the weights change next
            self._wait_copies()

    def close(self) -> None:
        """Remove the optimizer hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- CPU ---------------------------------------------------------------------------
    def _fill_host(self, piece: Piece, out: np.ndarray) -> None:
        # Numpy views of the tensors are kept between calls: one np.concatenate then
        # copies the piece with no per-tensor torch dispatch. They are rebuilt whenever a
        # tensor object or its storage changed (`p.data = ...`, a moved model).
        kind = piece.array
        tensors = self._tensors[kind]
        key = [(id(t), t.data_ptr()) for t in tensors]
        cached = self._views.get(kind)
        if cached is None or cached[0] != key:
            views = None
            if all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in _NUMPY_DTYPES
                   for t in tensors):
                views = [t.detach().reshape(-1).numpy() for t in tensors]
            cached = self._views[kind] = (key, views)
        parts = self._parts[piece]
        if cached[1] is not None:
            np.concatenate([cached[1][k][lo:hi] for k, lo, hi in parts], out=out,
                           casting="same_kind")
        else:
            with torch.no_grad():
                torch.from_numpy(out).copy_(torch.cat(
                    [tensors[k].detach().reshape(-1)[lo:hi].float() for k, lo, hi in parts]))

    # -- CUDA --------------------------------------------------------------------------
    def _side_stream(self, device: torch.device):
        if getattr(self, "_stream", None) is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _fill_cuda(self, piece: Piece, out: np.ndarray) -> None:
        dst = torch.from_numpy(out)
        with torch.no_grad(), torch.cuda.stream(self._cuda):
            if piece.array == "grad_norm":
                dst.copy_(self._norms[piece.start:piece.stop], non_blocking=True)
                return
            if piece.array == "buffers":
                dst.copy_(self._tensors["buffers"][0][piece.start:piece.stop],
                          non_blocking=True)
                return
            tensors, at = self._tensors[piece.array], 0
            for k, lo, hi in self._parts[piece]:
                src = tensors[k].detach().reshape(-1)[lo:hi]
                dst[at:at + hi - lo].copy_(src, non_blocking=True)
                at += hi - lo

    def _wait_copies(self, *_args) -> None:
        # The training stream (not the host) waits until the last step's copies are done.
        done, self._done = self._done, None
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
