"""`Recorder`: dense checkpoints from any PyTorch loop into a Zarr history group.

The training step pays for one device-to-host copy of the weights into a preallocated
chunk buffer; compression and disk writes happen on a background thread. At most
`max_pending` full chunks wait for the writer, so memory stays bounded: when the disk
falls behind, `record` blocks instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ckpt_tools.provenance import provenance
from ckpt_tools.schedule import Schedule
from ckpt_tools.store import (
    CHUNK_STEPS,
    HistoryWriter,
    ResumePoint,
    StoreError,
    as_location,
    first_mismatch,
)
from ckpt_tools.store.layout import ATTRS_KEY, to_json_safe
from ckpt_tools.tensors import buffer_specs, param_specs, unwrap

__all__ = ["Recorder"]


@dataclass
class _Chunk:
    """Rows of one storage chunk being filled (`index` is the chunk number)."""

    params: np.ndarray  # (CHUNK_STEPS, n_params) float32
    buffers: np.ndarray  # (CHUNK_STEPS, n_buffers) float32
    grad_norm: np.ndarray  # (CHUNK_STEPS, n_layers) float32
    index: int = -1
    rows: list[int] = field(default_factory=list)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

    def reset(self, index: int) -> _Chunk:
        # No refill here (that is 16 MiB of writes on the training thread): rows left
        # unrecorded are set to NaN by the writer thread before the chunk is written.
        self.index, self.rows, self.scalars = index, [], {}
        return self

    def blank_unrecorded(self, lo: int, hi: int) -> None:
        """Set the rows in `lo:hi` that were not recorded to NaN."""
        for row in sorted(set(range(lo, hi)) - set(self.rows)):
            for array in (self.params, self.buffers, self.grad_norm):
                array[row] = np.nan


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool}


def _background_priority() -> None:
    """Lower the calling thread's CPU priority (nice +10) where the OS allows it.

    Not idle priority: on a machine shared with other jobs an idle-priority writer
    starves, the bounded queue fills, and training stalls behind it.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _is_writer_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _as_schedule(schedule: Schedule | str | Iterable[int]) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        return Schedule.parse(schedule)
    return Schedule.from_steps(schedule)


class Recorder:
    """Record a model's parameters and buffers at the steps of a schedule.

    Args:
        path: The store (a directory ending in ``.zarr``, an ``s3://`` URL or a
            `Location`); created if missing.
        model: The model (a DDP wrapper is unwrapped); its state is read at each `record`.
        schedule: The steps to record (`Schedule`, its text form, or a list of steps).
        group: The history group inside the store.
        config: JSON-able description of the run, stored as provenance.
        optimizer: If given, its learning rate is recorded as `lr` at every step.
        eval_schedule: Steps at which `log_eval` will be called (own dimension
            `eval_step`).
        overwrite: Replace an existing group of the same name.
        resume: Continue an existing group: rows at and after the first step recorded in
            this session are rewritten. The group must have been recorded from the same
            architecture, schedule and `config`.
        max_pending: Full chunks allowed to wait for the writer before `record` blocks.
        codec: How `params` and `buffers` chunks are stored: ``"lz4"`` (default,
            lossless) or ``"none"`` (uncompressed, least CPU; compress later with
            ``ckpt compact``). A resumed group keeps the codec it was created with.

        storage_options: Options for the file system of a URL `path` (for s3fs:
            ``endpoint_url``, ``key``, ``secret``, ...), on top of the AWS environment.

    Under `torch.distributed`, only rank 0 writes; `record` is a no-op elsewhere.
    """

    def __init__(
        self,
        path: str | Path,
        model: nn.Module,
        schedule: Schedule | str | Iterable[int],
        *,
        group: str = "train",
        config: Mapping | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        eval_schedule: Schedule | str | Iterable[int] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        max_pending: int = 2,
        codec: str = "lz4",

        storage_options: Mapping | None = None,
    ):
        self.path, self.group = as_location(path, storage_options), group
        self.schedule = _as_schedule(schedule)
        self.eval_schedule = _as_schedule(eval_schedule) if eval_schedule is not None else None
        self.active = _is_writer_rank()
        self._model = unwrap(model)
        self._optimizer = optimizer
        self._index = {s: i for i, s in enumerate(self.schedule.steps)}
        self._last = -1
        self._closed = False
        if not self.active:
            return
        self.params, self.buffers = param_specs(self._model), buffer_specs(self._model)
        self._sources = self._tensor_sources()
        self._views: dict[str, tuple] = {}
        self._writer = self._open_writer(config, overwrite=overwrite, resume=resume,
                                         codec=codec)
        n_p = sum(s.size for s in self.params)
        n_b = sum(s.size for s in self.buffers)
        self._free: queue.Queue[_Chunk] = queue.Queue()
        for _ in range(max_pending + 1):
            self._free.put(
                _Chunk(
                    np.empty((CHUNK_STEPS, n_p), np.float32),
                    np.empty((CHUNK_STEPS, n_b), np.float32),
                    np.empty((CHUNK_STEPS, len(self.params)), np.float32),
                )
            )
        self._todo: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._chunk: _Chunk | None = None
        self._thread = threading.Thread(target=self._drain, name="ckpt-writer", daemon=True)
        self._thread.start()

    # -- set-up -------------------------------------------------------------------------
    def _open_writer(
        self, config: Mapping | None, *, overwrite: bool, resume: bool, codec: str
    ) -> HistoryWriter:
        if resume:
            writer = HistoryWriter.reopen(self.path, self.group)
            try:
                self._check_matches(writer, config)
            except BaseException:
                writer.release()
                raise
            return writer
        config = config or {}
        attrs = {
            "config": dict(config),
            "seed": config.get("seed"),
            "schedule": self.schedule.to_json(),
            "eval_schedule": self.eval_schedule.to_json() if self.eval_schedule else None,
            "model": type(self._model).__name__,
            "chunk_steps": CHUNK_STEPS,
            # CPU reductions split work by thread; an exact resume uses the same count.
            "torch_threads": torch.get_num_threads(),
        }
        return HistoryWriter.create(
            self.path, self.group, steps=self.schedule.steps, params=self.params,
            buffers=self.buffers, attrs=attrs, root_attrs=provenance(),
            eval_steps=self.eval_schedule.steps if self.eval_schedule else (),
            overwrite=overwrite, codec=codec,
        )

    def _check_matches(self, writer: HistoryWriter, config: Mapping | None) -> None:
        where = f"group '{self.group}' in {self.path}"
        for kind, stored, ours in (("parameter", writer.params, self.params),
                                   ("buffer", writer.buffers, self.buffers)):
            problem = first_mismatch(stored, ours, kind=kind)
            if problem:
                raise StoreError(f"{where} was recorded from another architecture: {problem}; "
                                 "resume with the same model or record into a new store")
        if tuple(int(s) for s in writer.steps) != self.schedule.steps:
            raise StoreError(f"{where} has a different schedule")
        if config is None:  # the caller does not say: nothing to compare
            return
        stored = writer.group.attrs[ATTRS_KEY].get("config", {})
        given = to_json_safe(dict(config))
        for key in sorted(set(stored) | set(given)):
            if stored.get(key) != given.get(key):
                raise StoreError(f"{where} was recorded with {key}={stored.get(key)!r}, not "
                                 f"{given.get(key)!r}; resume with the stored configuration")

    def _tensor_sources(self) -> list[tuple[nn.Module, str]]:
        # (module, attribute) pairs, so a buffer re-assigned by the model is still found.
        out = []
        for spec in [*self.params, *self.buffers]:
            owner, _, attr = spec.name.rpartition(".")
            out.append((self._model.get_submodule(owner), attr))
        return out

    # -- hot path -----------------------------------------------------------------------
    def record(self, step: int, **scalars: float) -> bool:
        """Copy the model's state if `step` is scheduled; return whether it was recorded.

        Call it after the optimizer update, so step s holds the weights after s updates.
        Scalars (e.g. ``loss=...``) are stored per step under their keyword names.

        Raises:
            ValueError: if `step` is not later than the previously recorded step.
            RuntimeError: if the background writer failed (the cause is chained).
        """
        i = self._index.get(step)
        if i is None or not self.active:
            return False
        if self._closed:
            raise RuntimeError("record() called on a closed Recorder")
        if i <= self._last:
            raise ValueError(f"step {step} recorded out of order (after step "
                             f"{self.schedule.steps[self._last]})")
        self._raise_writer_error()
        chunk_no, row = divmod(i, CHUNK_STEPS)
        if self._chunk is None or self._chunk.index != chunk_no:
            self._flush()
            self._chunk = self._free.get().reset(chunk_no)
        chunk = self._chunk
        with torch.no_grad():
            tensors = [getattr(m, a) for m, a in self._sources]
            n = len(self.params)
            self._copy_row(tensors[:n], chunk.params[row], "params")
            if self.buffers:
                self._copy_row(tensors[n:], chunk.buffers[row], "buffers")
            grads = [t.grad for t in tensors[:n]]
            present = [k for k, g in enumerate(grads) if g is not None]
            if len(present) < n:
                chunk.grad_norm[row] = np.nan
            if present:
                norms = torch._foreach_norm([grads[k] for k in present])
                chunk.grad_norm[row, present] = torch.stack(norms).float().cpu().numpy()
        if self._optimizer is not None and "lr" not in scalars:
            scalars["lr"] = self._optimizer.param_groups[0]["lr"]
        for name, value in scalars.items():
            column = chunk.scalars.setdefault(name, np.full(CHUNK_STEPS, np.nan))
            column[row] = float(value)
        chunk.rows.append(row)
        self._last = i
        return True

    def _copy_row(self, tensors: list[torch.Tensor], out: np.ndarray, kind: str) -> None:
        # On the CPU, numpy views of the tensors are kept between calls: one
        # np.concatenate then copies the row with no per-tensor dispatch (~0.05 ms for
        # ResNet-20 instead of ~0.3 ms). The views are rebuilt whenever a tensor object
        # or its storage changed (`p.data = ...`, a moved model).
        key = [(id(t), t.data_ptr()) for t in tensors]
        cached = self._views.get(kind)
        if cached is None or cached[0] != key:
            views = None
            if all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in _NUMPY_DTYPES
                   for t in tensors):
                views = [t.detach().reshape(-1).numpy() for t in tensors]
            cached = self._views[kind] = (key, views)
        if cached[1] is not None:
            np.concatenate(cached[1], out=out, casting="same_kind")
        else:
            torch.from_numpy(out).copy_(torch.cat([t.detach().reshape(-1).float()
                                                   for t in tensors]))

    def log_eval(self, step: int, **metrics: float) -> bool:
        """Store evaluation metrics (e.g. ``test_loss``, ``test_accuracy``) for `step`.

        Returns False (and stores nothing) when `step` is not in the evaluation schedule.
        """
        if not self.active or self.eval_schedule is None or step not in self.eval_schedule:
            return False
        self._raise_writer_error()
        self._flush()
        self._todo.put(("eval", self.eval_schedule.index(step), dict(metrics)))
        return True

    def save_resume_point(self, point: ResumePoint) -> None:
        """Make `point` the group's resume point once everything recorded so far is written.

        `point` must hold copies (see `ckpt_tools.train_state.capture`), taken after the
        last `record` call; the writer thread stores it after committing every row and
        evaluation queued before it, so the point never runs ahead of the rows.
        """
        if not self.active:
            return
        self._raise_writer_error()
        self._flush()
        self._todo.put(("resume", point))

    def mark_complete(self) -> None:
        """Record that the history is finished; its resume state is dropped."""
        if not self.active:
            return
        self._raise_writer_error()
        self._flush()
        self._todo.put(("complete",))

    def _flush(self) -> None:
        if self._chunk is not None and self._chunk.rows:
            self._todo.put(("rows", self._chunk))
        elif self._chunk is not None:
            self._free.put(self._chunk)
        self._chunk = None

    # -- background writer --------------------------------------------------------------
    def _drain(self) -> None:
        # Compression runs on this thread's own event loop and executor, at lowered CPU
        # priority: on a machine whose cores all train, it mostly fills the gaps between
        # operations instead of pre-empting training threads (which then stall the
        # others at every parallel barrier). When it falls behind, `record` blocks on
        # the bounded queue and training waits for it.
        _background_priority()
        codecs = ThreadPoolExecutor(1, "ckpt-codec", initializer=_background_priority)
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(codecs)
        try:
            while True:
                item = self._todo.get()
                try:
                    if item is None:
                        return
                    if self._error is None:
                        self._write(item)
                except BaseException as exc:  # reported to the training thread
                    self._error = exc
                finally:
                    if item is not None and item[0] == "rows":
                        self._free.put(item[1])
                    self._todo.task_done()
        finally:
            self._loop.close()
            codecs.shutdown()

    def _write(self, item) -> None:
        if item[0] == "eval":
            self._writer.write_eval(item[1], item[2])
            return
        if item[0] == "resume":
            self._writer.save_resume_point(item[1])
            return
        if item[0] == "complete":
            self._writer.mark_complete()
            return
        chunk: _Chunk = item[1]
        lo, hi = min(chunk.rows), max(chunk.rows) + 1
        chunk.blank_unrecorded(lo, hi)
        base = chunk.index * CHUNK_STEPS
        write = self._writer.write_rows_async(
            base + lo,
            chunk.params[lo:hi],
            chunk.buffers[lo:hi],
            chunk.grad_norm[lo:hi],
            {name: col[lo:hi] for name, col in chunk.scalars.items()},
        )
        self._loop.run_until_complete(write)
        self._writer.commit(base + np.asarray(chunk.rows))

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing to {self.path} failed: {self._error}") from self._error

    def flush(self) -> None:
        """Write everything recorded so far and wait until it is committed."""
        if not self.active or self._closed:
            return
        self._flush()
        self._todo.join()
        self._raise_writer_error()

    def close(self) -> None:
        """Flush, stop the writer and re-consolidate metadata; raise any writer error."""
        if self._closed or not self.active:
            self._closed = True
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._todo.put(None)
            self._thread.join()
            try:
                if self._error is None:
                    self._writer.close()
            finally:
                self._writer.release()
        self._raise_writer_error()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
