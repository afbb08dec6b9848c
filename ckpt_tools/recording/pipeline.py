"""The writer side of recording: shared-memory blocks, writer processes, commits.

The training thread fills blocks of a `SharedRegion` and hands each one to a `Pipeline`
with `submit`. A coordinator thread in the training process sends every piece of the
block (a chunk-aligned column range of one store array) to a writer process
(`ckpt_tools.store.row_writer`) as a short JSON command naming its place in the region,
and, once every piece of a set of rows is written, asks writer 0 to write their scalars and
then their `committed` flags. The coordinator only moves small messages; compression and
file writes happen in the writer processes, so they never take the training process's
interpreter lock. A piece goes to the same writer every time (its chunk is then written
in order even when one chunk is filled by two blocks), and the writers share the pieces
round-robin.

Rare operations that read or rewrite metadata (evaluation metrics, resume points,
marking the run complete) are queued behind the rows recorded before them and run on the
coordinator thread with the training process's `HistoryWriter`, once those rows are
committed.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import queue
import selectors
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ckpt_tools.recording import writers as writers_
from ckpt_tools.recording.budget import Piece

__all__ = ["Block", "Pipeline", "SharedRegion"]


class SharedRegion:
    """Anonymous shared memory (a memfd on Linux) that writer processes inherit and map."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), mmap.PAGESIZE)
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("ckpt-rows", os.MFD_CLOEXEC)
        else:  # an unlinked file: freed with the last process that maps it
            fd, name = tempfile.mkstemp(prefix="ckpt-rows-", dir="/dev/shm"
                                        if os.path.isdir("/dev/shm") else None)
            os.unlink(name)
            self.fd = fd
        os.ftruncate(self.fd, self.nbytes)
        self.map = mmap.mmap(self.fd, self.nbytes)

    def floats(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 view of `shape` starting `offset` float32 elements into the region."""
        return np.ndarray(shape, np.float32, buffer=self.map, offset=offset * 4)

    def close(self) -> None:
        """Unmap and close (views still alive keep the mapping until they go)."""
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class Block:
    """One shared-memory slot being filled with the rows of one segment.

    Attributes:
        slot: Index of the slot in the region.
        first: Store row (index along `step`) of the slot's first row.
        pieces: `(piece, view)` pairs: each view is `(rows, piece.width)` float32.
        offsets: Byte offset of each piece's view in the region.
        rows: Slot rows recorded so far (0-based within the slot).
        scalars: Per-step scalars of the recorded rows, by name (aligned with `rows`).
        batches: Example ids of each recorded row's batch, or None (aligned with `rows`).
        events: CUDA events that complete when the rows' device copies have landed.
        final: Whether this is the last segment of its rows (then they can commit).
        index: The block's number along `step` (its first row // rows per block).
        segment: Which segment of the row the block holds (0 unless streamed).
    """

    slot: int
    first: int
    pieces: list[tuple[Piece, np.ndarray]]
    offsets: list[int]
    rows: list[int] = field(default_factory=list)
    scalars: dict[str, list[float]] = field(default_factory=dict)
    batches: list = field(default_factory=list)
    events: list = field(default_factory=list)
    final: bool = True
    index: int = 0
    segment: int = 0


@dataclass
class _Rows:
    rows: list[int]
    scalars: dict[str, list[float]]
    hashes: dict[str, str] = field(default_factory=dict)
    batches: list = field(default_factory=list)
    pending: int = 0
    closed: bool = False
    sent: bool = False


class Pipeline:
    """Writer processes plus the coordinator thread that feeds them (see module docs).

    Args:
        region: The shared memory the blocks live in.
        slots: Number of slots in `region`.
        writers: Writer processes to start.
        store: The store location (path) the writers open.
        group: The history group inside it.
        lock_fd: The group lock's file descriptor: every writer holds it while it lives.
        control: Runs a control item (`("eval", ...)`, ...) with the training process's
            writer, on the coordinator thread, after the rows queued before it commit.
        ensure_scalar: Creates a scalar array before its first rows are written.
        ensure_batch: Creates the `batch` array before the first example ids are written.
        column_offsets: First store column of this process's rows, per array (0 unless
            several processes each write a slice of the columns).
        part: ``(rank, session)`` when several ranks write parts of each row (sharded
            models): writer 0 then flags this rank's part instead of committing (rank 0
            also commits the rows every rank has flagged), and rows carry no content
            hash (no process holds a whole row).
    """

    def __init__(
        self,
        region: SharedRegion,
        *,
        slots: int,
        writers: int,
        store: str,
        group: str,
        lock_fd: int | None,
        control: Callable[[tuple], None],
        ensure_scalar: Callable[[str], None],
        ensure_batch: Callable[[], None] | None = None,
        column_offsets: Mapping[str, int] | None = None,
        storage_options: Mapping | None = None,
        part: tuple[int, int] | None = None,
    ):
        self.region, self._control, self._ensure_scalar = region, control, ensure_scalar
        self._ensure_batch, self._batch_known = ensure_batch, False
        self._offsets = dict(column_offsets or {})
        self._part = list(part) if part is not None else None
        self.error: str | None = None
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self.free.put(slot)
        self._items: collections.deque = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        self._affinity: dict[tuple[str, int], int] = {}
        self._next_id = 0
        self._waiting: dict[int, tuple] = {}  # message id -> (kind, payload)
        self._queue: collections.deque = collections.deque()  # _Rows and control items
        self._inflight_slots: set[int] = set()
        self._scalars_known: set[str] = set()
        self._closing = False
        self._procs = writers_.take(max(int(writers), 1))
        fds = (region.fd,) + ((lock_fd,) if lock_fd is not None else ())
        if "://" not in str(store):  # a kept writer may run in another directory
            store = os.path.abspath(store)
        try:
            for proc in self._procs:
                proc.send({"op": "open", "id": -1, "store": str(store), "group": group,
                           "region_size": region.nbytes,
                           "storage_options": dict(storage_options or {}) or None}, fds)
        except BaseException:
            for proc in self._procs:
                proc.kill()
            raise
        self._thread = threading.Thread(target=self._run, name="ckpt-coordinator", daemon=True)
        self._thread.start()

    # -- messages to the writers ----------------------------------------------------
    def _send(self, writer: int, msg: dict, kind: str, payload) -> None:
        msg["id"] = self._next_id
        self._waiting[self._next_id] = (kind, payload)
        self._next_id += 1
        self._procs[writer].send(msg)

    def _writer_for(self, piece: Piece) -> int:
        key = (piece.array, piece.start)
        if key not in self._affinity:
            self._affinity[key] = len(self._affinity) % len(self._procs)
        return self._affinity[key]

    # -- the training thread's side --------------------------------------------------
    def submit(self, block: Block) -> None:
        """Hand a filled block to the writers (returns at once)."""
        self._put(("block", block))

    def control(self, item: tuple) -> None:
        """Queue a control item behind everything submitted so far."""
        self._put(("control", item))

    def sync(self) -> None:
        """Wait until everything submitted so far is committed (or the pipeline failed)."""
        done = threading.Event()
        self._put(("sync", done))
        while not done.wait(0.5):
            if not self._thread.is_alive():
                break

    def check(self) -> str | None:
        """The pipeline's error, if any: a writer's, or a writer process that has died."""
        if self.error is None and not self._closing:
            for proc in self._procs:
                if not proc.alive():
                    self._set_error(proc.describe_exit())
        return self.error

    def _put(self, item) -> None:
        self._items.append(item)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Stop the coordinator and end the writers' session (after `sync`); idempotent.

        Writers whose session ended cleanly are kept for the next recording.
        """
        self._closing = True
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()
        procs, self._procs = self._procs, []
        clean = []
        for proc in procs:
            reply = None
            if self.error is None:
                with contextlib.suppress(OSError):
                    proc.send({"op": "end", "id": -2})
                    reply = proc.recv()
            if reply is not None and "error" not in reply:
                clean.append(proc)
            else:
                proc.kill()
        writers_.give_back(clean)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the coordinator thread ------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        for k, proc in enumerate(self._procs):
            sel.register(proc.fileno(), selectors.EVENT_READ, k)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                    else:
                        self._read_ack(key.data, sel)
                while self._items:
                    item = self._items.popleft()
                    if item is None:
                        self._fail_pending()
                        return
                    self._take(item)
                if self.error is None:
                    self._advance()
                else:
                    self._fail_pending()
        except BaseException as exc:  # never leave the training thread waiting
            self._set_error(f"{type(exc).__name__}: {exc}")
            self._fail_pending()
        finally:
            sel.close()

    def _take(self, item) -> None:
        kind, payload = item
        if kind == "block":
            self._dispatch(payload)
        else:
            self._queue.append((kind, payload))

    def _dispatch(self, block: Block) -> None:
        rows = self._queue[-1] if self._queue and isinstance(self._queue[-1], _Rows) \
            and not self._queue[-1].closed else None
        if rows is None:
            rows = _Rows([], {})
            self._queue.append(rows)
        if block.final:
            rows.rows = [block.first + r for r in block.rows]
            rows.scalars = block.scalars
            rows.batches = block.batches
            rows.closed = True
        if self.error is not None or not block.rows or not block.pieces:
            self._release(block.slot)
            return
        for event in block.events:  # the device copies of these rows have landed
            while not event.query():  # polled: a blocking wait would count as a sync
                time.sleep(0.0005)
        lo, hi = min(block.rows), max(block.rows) + 1
        n_pieces = len(block.pieces)
        state = {"left": n_pieces, "slot": block.slot, "rows": rows}
        rows.pending += n_pieces
        self._inflight_slots.add(block.slot)
        for (piece, _), offset in zip(block.pieces, block.offsets, strict=True):
            msg = {"op": "write", "array": piece.array,
                   "offset": offset + lo * piece.width * 4,
                   "rows": [block.first + lo, hi - lo],
                   "cols": [self._offsets.get(piece.array, 0) + piece.start, piece.width]}
            self._send(self._writer_for(piece), msg, "piece", state)
        # The rows' content hashes: one writer per block (per row when streamed, so a
        # row's hash continues where its previous segment left it).
        if self._part is not None:
            return
        parts = [[offset, piece.width] for (piece, _), offset
                 in zip(block.pieces, block.offsets, strict=True)
                 if piece.array in ("params", "buffers")]
        state["left"] += 1
        rows.pending += 1
        self._send(block.index % len(self._procs), {
            "op": "hash", "first": block.first, "rows": sorted(block.rows), "parts": parts,
            "start": block.segment == 0, "final": block.final}, "piece", state)

    def _read_ack(self, writer: int, sel) -> None:
        proc = self._procs[writer]
        reply = proc.recv()
        if reply is None:  # the process has gone
            sel.unregister(proc.fileno())
            self._set_error(proc.describe_exit())
            self._fail_pending()
            return
        if reply.get("error"):
            self._set_error(reply["error"])
        if reply["id"] < 0:
            return
        kind, payload = self._waiting.pop(reply["id"])
        if kind == "piece":
            payload["rows"].hashes.update(reply.get("digests", {}))
            payload["left"] -= 1
            payload["rows"].pending -= 1
            if payload["left"] == 0 and payload["slot"] in self._inflight_slots:
                self._inflight_slots.discard(payload["slot"])
                self._release(payload["slot"])
        elif kind == "commit" and self._queue and self._queue[0] is payload:
            self._queue.popleft()
        if self.error is not None:
            self._fail_pending()

    def _advance(self) -> None:
        # Commit complete rows in order; run control items once everything before is in.
        while self._queue and self.error is None:
            head = self._queue[0]
            if isinstance(head, _Rows):
                if not (head.closed and head.pending == 0) or head.sent:
                    return
                if not head.rows:
                    self._queue.popleft()
                    continue
                for name in head.scalars:
                    if name not in self._scalars_known:
                        self._ensure_scalar(name)
                        self._scalars_known.add(name)
                msg = {"op": "commit", "rows": head.rows, "scalars": head.scalars}
                if any(b is not None for b in head.batches):
                    if not self._batch_known:
                        self._ensure_batch()
                        self._batch_known = True
                    msg["batch"] = [None if b is None else b.tolist() for b in head.batches]
                head.sent = True
                hashes = [head.hashes.get(str(r)) for r in head.rows]
                msg["hashes"] = hashes if all(hashes) else None
                msg["part"] = self._part
                self._send(0, msg, "commit", head)
                return
            kind, payload = self._queue.popleft()
            if kind == "sync":
                payload.set()
            else:
                try:
                    self._control(payload)
                except BaseException as exc:
                    self._set_error(" ".join(str(exc).split()) or type(exc).__name__)

    def _set_error(self, message: str) -> None:
        if self.error is None:
            self.error = message

    def _release(self, slot: int) -> None:
        self.free.put(slot)

    def _fail_pending(self) -> None:
        # After an error: free every slot so `record` can raise, and wake every waiter.
        if self.error is None:
            return
        for slot in list(self._inflight_slots):
            self._inflight_slots.discard(slot)
            self._release(slot)
        for kind, payload in [q for q in self._queue if not isinstance(q, _Rows)]:
            if kind == "sync":
                payload.set()
        self._queue.clear()
        while self._items:
            item = self._items.popleft()
            if item is None:
                continue
            kind, payload = item
            if kind == "block":
                self._release(payload.slot)
            elif kind == "sync":
                payload.set()

    @property
    def pids(self) -> Sequence[int]:
        """Process ids of the writer processes."""
        return [p.pid for p in self._procs]
