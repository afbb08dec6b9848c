"""`Recorder`: dense checkpoints from any PyTorch loop into a Zarr history group.

The training thread pays for one copy of the weights into shared memory (on CUDA, a
non-blocking copy queued on a side stream); writer processes compress and write them
(`ckpt_tools.recording`). Host memory stays within `host_memory` whatever the model's
size: the steps per storage chunk follow from it, and a model whose row does not fit is
streamed. When the writers fall behind, `record` waits for a free block instead of
queueing without limit.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ckpt_tools.optim_state import ARRAY_PREFIX, state_names
from ckpt_tools.recording import budget as _budget
from ckpt_tools.recording import history
from ckpt_tools.recording.gather import Gather
from ckpt_tools.recording.pipeline import Block, Pipeline, SharedRegion
from ckpt_tools.recording.select import patterns, select
from ckpt_tools.schedule import Schedule
from ckpt_tools.sharded import ShardedRows, is_sharded, model_class_name
from ckpt_tools.store import HistoryWriter, ResumePoint, StoreError, as_location, read_group_meta
from ckpt_tools.store.history_extras import batch_width
from ckpt_tools.store.layout import SHARD_BYTES, row_array_layout
from ckpt_tools.tensors import buffer_specs, param_specs, unwrap

__all__ = ["Recorder", "default_writers"]


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _as_schedule(schedule: Schedule | str | Iterable[int]) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        return Schedule.parse(schedule)
    return Schedule.from_steps(schedule)


def default_writers(device: torch.device | str = "cpu") -> int:
    """Writer processes for the cores training leaves free (1 to 8).

    On the CPU, training keeps `torch.get_num_threads()` cores busy; on a GPU, one.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    busy = 1 if torch.device(device).type == "cuda" else torch.get_num_threads()
    return max(1, min(8, cores - busy))


class Recorder:
    """Record a model's parameters and buffers at the steps of a schedule.

    Args:
        path: The store (a directory ending in ``.zarr``, an ``s3://`` URL or a
            `Location`); created if missing.
        model: The model (a DDP wrapper is unwrapped); its state is read at each `record`.
        schedule: The steps to record (`Schedule`, its text form, or a list of steps).
        group: The history group inside the store.
        config: JSON-able description of the run, stored as provenance.
        optimizer: If given, its learning rate is recorded as `lr` at every step (and, on
            CUDA, its next `step` waits on the device for the copies of the weights).
        eval_schedule: Steps at which `log_eval` will be called (own dimension
            `eval_step`).
        overwrite: Replace an existing group of the same name.
        resume: Continue an existing group: rows at and after the first step recorded in
            this session are rewritten. The group must have been recorded from the same
            architecture, schedule, tensor selection and `config`.
        host_memory: Bytes the recording may hold in host memory (an int, or a string
            with a binary unit such as ``"2GiB"``); default: a quarter of the RAM, at
            most 4 GiB. Steps per storage chunk follow from it (16 when they fit).
        writers: Writer processes (default: `default_writers`).
        include: Glob patterns of tensor names to record (default: all), e.g.
            ``["*attn*"]``; a string may list several, comma-separated.
        exclude: Glob patterns of tensor names not to record.
        codec: How `params` and `buffers` chunks are stored: ``"lz4"`` (default,
            lossless) or ``"none"`` (uncompressed, least CPU; compress later with
            ``ckpt compact``). A resumed group keeps the codec it was created with.
        storage_options: Options for the file system of a URL `path` (for s3fs:
            ``endpoint_url``, ``key``, ``secret``, ...), on top of the AWS environment.
        optimizer_state: Also record `optimizer`'s per-weight state (SGD's momentum,
            Adam's ``exp_avg`` and ``exp_avg_sq``, ...) at every recorded step, each entry
            as an ``optim_<entry>`` array laid out like ``params``
            (`ckpt_tools.optim_state`). None: as the resumed group was recorded, else no.

    Under `torch.distributed` with replicated parameters (DDP, or no wrapper), only
    rank 0 writes; `record` is a no-op elsewhere. When parameters are sharded (FSDP2's
    `fully_shard`, DTensors), every rank writes the chunks of `param` its shards cover
    (see `ckpt_tools.sharded`), and the constructor, `record`, `flush`, `log_eval`,
    `save_resume_point`, `mark_complete` and `close` are collective: every rank calls
    them at the same steps.

    Raises:
        ValueError: `host_memory` cannot hold one row (the message names the smallest
            budget that works), the patterns select no tensor, or `optimizer_state` is
            asked without an optimizer that keeps per-weight state.
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
        host_memory: int | str | None = None,
        writers: int | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        codec: str = "lz4",
        storage_options: Mapping | None = None,
        optimizer_state: bool | None = None,
    ):
        self.path, self.group = as_location(path, storage_options), group
        self.schedule = _as_schedule(schedule)
        self.eval_schedule = _as_schedule(eval_schedule) if eval_schedule is not None else None
        self._model = unwrap(model)
        self.rank, self._world = _rank_and_world()
        self._is_sharded = sharded = is_sharded(self._model)
        self.active = self.rank == 0 or sharded
        # Buffers, gradient norms, scalars and metadata: written by rank 0 only.
        self._whole = self.rank == 0
        self._sharded: ShardedRows | None = None
        self._session = 0
        self._optimizer = optimizer
        self._index = {s: i for i, s in enumerate(self.schedule.steps)}
        self._last = -1
        self._closed = True
        self._hooks: list = []  # optimizer hooks of `attach`
        self._batch_width: int | None = None  # of the `batch` array, once known
        self._states: tuple[str, ...] = ()
        if not self.active:
            return
        if optimizer_state is None:  # as the resumed group was recorded, else no
            optimizer_state = False
            if resume:
                with contextlib.suppress(StoreError):
                    optimizer_state = bool(read_group_meta(self.path, group)
                                           .get("optimizer_state"))
        if optimizer_state:
            if optimizer is None:
                raise ValueError("optimizer_state=True needs the optimizer: "
                                 "Recorder(..., optimizer=opt, optimizer_state=True)")
            if self._is_sharded:
                raise ValueError("optimizer_state=True is not supported for a sharded (FSDP) "
                                 "model; record its weights without it")
            self._states = state_names(optimizer)
        budget = _budget.parse_bytes(host_memory) if host_memory is not None \
            else _budget.default_host_memory()
        if writers is not None and int(writers) < 1:
            raise ValueError(f"writers must be at least 1, got {writers}")
        if resume and include is None and exclude is None:  # continue the stored selection
            with contextlib.suppress(StoreError):
                meta = read_group_meta(self.path, group)
                include, exclude = meta.get("include"), meta.get("exclude")
        self._patterns = {"include": patterns(include), "exclude": patterns(exclude)}
        self._codec = codec
        # A shard is encoded whole in a writer's memory: keep it a small part of the budget.
        # Sharded models: one chunk per storage unit (no Zarr sharding), since a unit must
        # stay much smaller than a rank's piece of a big tensor, or whole units would have
        # to travel to their one writing rank.
        self._shard_bytes = 0 if sharded else max(min(SHARD_BYTES, budget // 32), 1)
        self.params, self.buffers = self._selected()
        self.plan = self._plan(budget, writers)  # before touching the store
        if sharded:
            self._writer = self._open_shared_writer(config, overwrite=overwrite, resume=resume)
        else:
            self._writer = self._open_writer(config, overwrite=overwrite, resume=resume)
        try:
            self._start(sharded)
        except BaseException:
            self._writer.release()
            raise
        self._closed = False

    @property
    def param_columns(self) -> tuple[tuple[int, int], ...]:
        """The `(start, stop)` runs of the `param` axis this process writes (may be empty)."""
        if not self.active:
            return ()
        if self._sharded is not None:
            return self._sharded.columns
        return ((0, sum(s.size for s in self.params)),)

    # -- set-up -------------------------------------------------------------------------
    def _selected(self):
        chosen = [select(specs, self._patterns["include"], self._patterns["exclude"])
                  for specs in (param_specs(self._model), buffer_specs(self._model))]
        if not chosen[0] and not chosen[1]:
            raise ValueError(f"no tensor of {type(self._model).__name__} matches include="
                             f"{self._patterns['include']} exclude={self._patterns['exclude']}")
        return chosen

    def _widths(self) -> dict[str, int]:
        """Columns this process writes per row, by array."""
        return self._full_widths(sharded=True)

    def _full_widths(self, sharded: bool = False) -> dict[str, int]:
        n_params = sum(s.size for s in self.params)
        widths = {"params": n_params, "buffers": sum(s.size for s in self.buffers),
                  "grad_norm": len(self.params),
                  **{ARRAY_PREFIX + name: n_params for name in self._states}}
        if sharded and self._is_sharded:  # the columns this rank writes
            widths["params"] = (self._sharded.width if self._sharded is not None
                                else -(-n_params // self._world))  # about a share
            if not self._whole:
                widths["buffers"] = widths["grad_norm"] = 0
        return widths

    def _units(self, rows: int) -> dict[str, int]:
        # Columns per storage unit of a new group's arrays (a shard, else a chunk).
        out = {}
        for name in self._row_arrays():
            layout = row_array_layout(self._full_widths()[name], rows, codec=self._codec,
                                      shard_bytes=self._shard_bytes)
            out[name] = (layout["shards"] or layout["chunks"])[1]
        return out

    def _plan(self, budget: int, writers: int | None, units=None, chunk=None) -> _budget.Plan:
        units = units or self._units
        what = f"{type(self._model).__name__} ({self._widths()['params']:,} parameters)"
        if writers is not None:
            return _budget.plan(self._widths(), units, budget=budget, writers=int(writers),
                                chunk=chunk, what=what)
        device = next((t.device for t in self._model.parameters()), torch.device("cpu"))
        n = default_writers(device)
        while True:  # the default shrinks to what the budget can feed
            try:
                return _budget.plan(self._widths(), units, budget=budget, writers=n,
                                    chunk=chunk, what=what)
            except ValueError:
                if n == 1:
                    raise
                n -= 1

    def _row_arrays(self) -> list[str]:
        """The `(step, x)` arrays written in chunk-aligned pieces."""
        return ["params", "buffers", *(ARRAY_PREFIX + name for name in self._states)]

    def _open_writer(self, config, *, overwrite: bool, resume: bool) -> HistoryWriter:
        if not resume:
            return history.create(
                self.path, self.group, model=model_class_name(self._model),
                schedule=self.schedule, eval_schedule=self.eval_schedule, params=self.params,
                buffers=self.buffers, patterns=self._patterns, config=config,
                overwrite=overwrite, chunk_steps=self.plan.rows, codec=self._codec,
                shard_bytes=self._shard_bytes, optimizer_state=self._states,
            )
        writer = HistoryWriter.reopen(self.path, self.group)
        try:
            history.check_matches(
                writer, where=f"group '{self.group}' in {self.path}", params=self.params,
                buffers=self.buffers, schedule=self.schedule, patterns=self._patterns,
                config=config, optimizer_state=self._states,
            )
        except BaseException:
            writer.release()
            raise
        return writer

    def _open_shared_writer(self, config, *, overwrite: bool, resume: bool) -> HistoryWriter:
        # Rank 0 creates or reopens the group (holding its lock for the whole job) and
        # opens a session of per-rank flags; the others attach once it has, or raise the
        # same error when it could not.
        dist = torch.distributed
        outcome: list = [None, 0]
        if self._whole:
            try:
                writer = self._open_writer(config, overwrite=overwrite, resume=resume)
                try:
                    outcome[1] = writer.start_session(self._world)
                except BaseException:
                    writer.release()
                    raise
            except BaseException as exc:
                outcome[0] = " ".join(str(exc).split()) or type(exc).__name__
                dist.broadcast_object_list(outcome, src=0)
                raise
        dist.broadcast_object_list(outcome, src=0)
        self._session = int(outcome[1])
        if self._whole:
            return writer
        if outcome[0] is not None:
            raise StoreError(outcome[0])
        return HistoryWriter.attach(self.path, self.group)

    def _start(self, sharded: bool) -> None:
        # The layout of the arrays as stored decides the pieces (a resumed store may have
        # been made with other chunks).
        units = {name: self._writer.block_shape(name)[1] for name in self._row_arrays()}
        if sharded:  # collective: every rank finds its shards and its storage units
            tensors = [getattr(self._model.get_submodule(s.name.rpartition(".")[0]),
                               s.name.rpartition(".")[2]) for s in self.params]
            self._sharded = ShardedRows(self.params, tensors, units["params"])
            self._param_tensors = tensors
        else:
            self._writer.ensure_row_hashes()
        self.plan = self._plan(self.plan.budget, self.plan.writers, units,
                               chunk=self._writer.chunk_steps)
        if self._sharded is not None:
            self.plan = self._sharded.to_store(self.plan)
        self.chunk_steps = self._writer.chunk_steps
        self._batch_width = batch_width(self._writer.group)
        self._region = SharedRegion(self.plan.slots * self.plan.slot_floats * 4)
        self._pinned = self._pin_region()
        pieces = [p for seg in self.plan.segments for p in seg]
        if self._sharded is not None:  # parameters and their norms come from the shards
            pieces = [p for p in pieces if p.array == "buffers"]
        self._gather = Gather(self._model, [] if sharded else self.params,
                              self.buffers if self._whole else [], pieces, self._optimizer,
                              optimizer_state=self._states)
        self._blocks: dict[int, Block] = {}
        lock = self._writer.lock
        self._pipe = Pipeline(
            self._region, slots=self.plan.slots, writers=self.plan.writers,
            store=self.path.url, group=self.group,
            storage_options=self.path.storage_options,
            lock_fd=getattr(lock, "fileno", lambda: None)(),
            control=self._control, ensure_scalar=self._writer.ensure_scalar,
            ensure_batch=lambda: self._writer.ensure_batch(self._batch_width),
            part=(self.rank, self._session) if sharded else None,
        )

    def _pin_region(self) -> bool:
        # Page-locked shared memory lets CUDA copy into it asynchronously.
        device = next((t.device for t in self._model.parameters()), torch.device("cpu"))
        if device.type != "cuda":
            return False
        self._pin_view = np.frombuffer(self._region.map, np.uint8)
        code = int(torch.cuda.cudart().cudaHostRegister(
            self._pin_view.ctypes.data, self._region.nbytes, 1))
        return code == 0

    # -- hot path -----------------------------------------------------------------------
    def record(
        self,
        step: int,
        *,
        grad_norm: Sequence[float] | torch.Tensor | None = None,
        batch: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        **scalars: float,
    ) -> bool:
        """Copy the model's state if `step` is scheduled; return whether it was recorded.

        Call it after the optimizer update, so step s holds the weights after s updates.
        Scalars (e.g. ``loss=...``) are stored per step under their keyword names.

        Args:
            step: Optimizer updates done so far.
            grad_norm: The L2 norm of each parameter tensor's gradient, in
                `named_parameters` order, when measured before the gradients were cleared
                (default: measured now from ``.grad``; NaN where there is none).
            batch: The example ids (non-negative integers) of the batch of update `step`;
                no wider than the first batch recorded (see ``docs/store-format.md``).
            **scalars: Per-step numbers, by name.

        Raises:
            ValueError: if `step` is not later than the previously recorded step, or
                `grad_norm` or `batch` do not fit (nothing is recorded then).
            RuntimeError: if writing failed (a writer process died, the disk is full):
                the message names the cause; steps committed before stay stored.
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
        ids = self._batch_ids(step, batch) if batch is not None else None
        if grad_norm is not None:
            grad_norm = np.asarray(torch.as_tensor(grad_norm).detach().float().cpu(),
                                   dtype=np.float32).reshape(-1)
            if grad_norm.size != len(self.params):
                raise ValueError(f"grad_norm holds {grad_norm.size} norms; the recorded "
                                 f"model has {len(self.params)} parameter tensors")
        rows = self.plan.rows
        first, row = i - i % rows, i % rows
        if self._optimizer is not None and "lr" not in scalars:
            scalars["lr"] = self._optimizer.param_groups[0]["lr"]
        if not self._whole:
            scalars, ids = {}, None
        self._gather.begin(grad_norm if self._sharded is None else None)
        if self._sharded is not None:
            with torch.no_grad():
                self._sharded.take(self._param_tensors)
        last = len(self.plan.segments) - 1
        for seg_no, segment in enumerate(self.plan.segments):
            block = self._blocks.get(seg_no)
            if block is not None and block.first != first:
                self._submit(seg_no)
                block = None
            if block is None:
                block = self._blocks[seg_no] = self._new_block(segment, first, seg_no, last)
            for piece, view in block.pieces:
                if self._sharded is not None and piece.array != "buffers":
                    self._sharded.fill(piece, view[row])
                else:
                    self._gather.fill(piece, view[row])
            event = self._gather.copied()
            if event is not None:
                block.events.append(event)
            if block.final:
                self._add_scalars(block, row, scalars)
                block.batches.append(ids)
            else:
                block.rows.append(row)
            if row == rows - 1 or last:
                self._submit(seg_no)
        self._gather.end()
        self._last = i
        return True

    def _batch_ids(self, step: int, batch) -> np.ndarray:
        ids = np.asarray(torch.as_tensor(batch).detach().cpu()).reshape(-1)
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0):
            raise ValueError(f"batch ids at step {step} must be non-negative integers")
        width = self._batch_width if self._batch_width is not None else ids.size
        if ids.size > width:
            raise ValueError(f"{ids.size} example ids at step {step}, more than the "
                             f"{width} of the first recorded batch (the width of 'batch')")
        self._batch_width = width
        return ids.astype(np.int64)

    def _new_block(self, segment, first: int, seg_no: int, last: int) -> Block:
        slot = self._take_slot()
        base, pieces, offsets = slot * self.plan.slot_floats, [], []
        for piece in segment:
            pieces.append((piece, self._region.floats(base, (self.plan.rows, piece.width))))
            offsets.append(base * 4)
            base += self.plan.rows * piece.width
        return Block(slot, first, pieces, offsets, final=seg_no == last,
                     index=first // self.plan.rows, segment=seg_no)

    def _take_slot(self) -> int:
        while True:
            try:
                slot = self._pipe.free.get(timeout=1.0)
            except queue.Empty:  # check that the pipeline still lives
                self._raise_writer_error()
                continue
            self._raise_writer_error()
            return slot

    @staticmethod
    def _add_scalars(block: Block, row: int, scalars: Mapping[str, float]) -> None:
        n = len(block.rows)
        for name in scalars:
            block.scalars.setdefault(name, [math.nan] * n)
        for name, column in block.scalars.items():
            column.append(float(scalars.get(name, math.nan)))
        block.rows.append(row)

    def _submit(self, seg_no: int) -> None:
        block = self._blocks.pop(seg_no, None)
        if block is None:
            return
        if block.rows:  # rows skipped inside the written range are stored as NaN
            lo, hi = min(block.rows), max(block.rows) + 1
            for r in sorted(set(range(lo, hi)) - set(block.rows)):
                for _, view in block.pieces:
                    view[r] = np.nan
        block.pieces = [(p, None) for p, _ in block.pieces]  # no views past the hand-over
        self._pipe.submit(block)

    def _submit_all(self) -> None:
        for seg_no in sorted(self._blocks):
            self._submit(seg_no)

    def attach(self, optimizer: torch.optim.Optimizer, *, start_step: int = 0):
        """Record from `optimizer`'s step post-hook: the loop itself needs no change.

        Records `start_step` now (the weights as they are), then, counting the updates
        itself, step ``start_step + s`` right after the s-th `optimizer.step()` (a no-op
        off the schedule), with the update's learning rate and gradient norms. `close`
        removes the hook.

        Args:
            optimizer: The optimizer that updates the recorded model.
            start_step: Updates already done (when the loop continues a run).

        Returns:
            The hook's handle (``handle.remove()`` stops recording from it).
        """
        if self._optimizer is None:  # its learning rate goes with every step
            self._optimizer = optimizer
        count = [int(start_step)]
        self.record(count[0])

        def after_step(opt, args, kwargs) -> None:
            count[0] += 1
            self.record(count[0])

        handle = optimizer.register_step_post_hook(after_step)
        self._hooks.append(handle)
        return handle

    # -- everything else goes behind the rows -------------------------------------------
    def log_eval(self, step: int, **metrics: float) -> bool:
        """Store evaluation metrics (e.g. ``test_loss``, ``test_accuracy``) for `step`.

        Returns False (and stores nothing) when `step` is not in the evaluation schedule.
        """
        if not self._whole or self.eval_schedule is None or step not in self.eval_schedule:
            return False
        self._queue(("eval", self.eval_schedule.index(step), dict(metrics)))
        return True

    def save_resume_point(self, point: ResumePoint) -> None:
        """Make `point` the group's resume point once everything recorded so far is written.

        `point` must hold copies (see `ckpt_tools.train_state.capture`), taken after the
        last `record` call; it is stored after every row and evaluation queued before it
        is committed, so the point never runs ahead of the rows.
        """
        if self._sharded is not None:
            self.flush()  # every rank's rows up to here are committed before the point
        if self.active and self._whole:
            self._queue(("resume", point))

    def mark_complete(self) -> None:
        """Record that the history is finished; its resume state is dropped."""
        if self._sharded is not None:
            self.flush()
        if self.active and self._whole:
            self._queue(("complete",))

    def _queue(self, item: tuple) -> None:
        self._raise_writer_error()
        self._submit_all()
        self._pipe.control(item)

    def _control(self, item: tuple) -> None:  # on the coordinator thread
        if item[0] == "eval":
            self._writer.write_eval(item[1], item[2])
        elif item[0] == "resume":
            self._writer.save_resume_point(item[1])
        elif item[0] == "complete":
            self._writer.mark_complete()
        elif item[0] == "commit_ready":
            self._writer.commit_ready(self._session)

    def _raise_writer_error(self) -> None:
        error = getattr(self, "_pipe", None) and self._pipe.check()
        if error:
            raise RuntimeError(f"writing to {self.path} failed: {error}; the steps committed "
                               "before are kept")

    def flush(self) -> None:
        """Write everything recorded so far and wait until it is committed.

        Collective when the model is sharded: every rank calls it.
        """
        if not self.active or self._closed:
            return
        self._submit_all()
        self._pipe.sync()
        self._raise_writer_error()
        if self._sharded is not None:
            torch.distributed.barrier()  # every rank's parts are written and flagged
            if self._whole:
                self._pipe.control(("commit_ready",))
                self._pipe.sync()
                self._raise_writer_error()

    def close(self) -> None:
        """Flush, stop the writers and re-consolidate metadata; raise any writer error."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._closed or not self.active:
            self._closed = True
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._pipe.close()
            self._gather.close()
            try:
                if self._pipe.error is None and self._whole:
                    self._writer.close()
            finally:
                self._writer.release()
                self._unpin()
        self._raise_writer_error()

    def _unpin(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._pin_view.ctypes.data)
            self._pinned = False
        self._pin_view = None
        self._blocks.clear()
        self._region.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
