"""A writer process of the recording pipeline: compresses row blocks and writes them.

The training process starts it as ``python -P row_writer.py CONFIG`` (see
`ckpt_tools.recording.writers`). It imports numpy and zarr only, never torch or the
`ckpt_tools` package, so it starts in well under a second with ~50 MiB of its own, and the
training process's interpreter lock is never taken by compression or file writes.

The rows themselves are never sent: both processes map one shared-memory region, and a
command names where a block lies in it. Commands arrive as JSON objects, one per packet
of a ``SOCK_SEQPACKET`` socket, and each is answered by one packet:

- ``{"op": "open", "store": PATH, "group": G, "region_size": BYTES}`` with the region's
  and the group lock's file descriptors attached (``SCM_RIGHTS``): start a session;
- ``{"op": "write", "id": N, "array": A, "offset": BYTES, "rows": [R0, N_ROWS],
  "cols": [C0, N_COLS]}``: write the `(N_ROWS, N_COLS)` float32 block at `offset` of the
  region into ``A[R0:R0+N_ROWS, C0:C0+N_COLS]`` (the parent aligns blocks to chunks);
- ``{"op": "hash", "id": N, "first": R, "rows": [...], "parts": [[OFFSET, N_COLS], ...],
  "start": bool, "final": bool}``: feed rows `first + r` of the block's `params` and
  `buffers` pieces (in row order) to each row's SHA-256 (`ckpt_tools.store.integrity`:
  little-endian float32 params, then buffers); a row streamed in segments continues the
  hash of its previous segment. With `final`, the reply carries ``"digests"`` (hex by row);
- ``{"op": "commit", "id": N, "rows": [...], "scalars": {NAME: [...]}, "hashes": [...],
  "batch": [...]}``: write the per-step scalars and content hashes of `rows` and their
  batches' example ids (optional: a list of ids or null per row, padded with -1 to the
  width of ``batch``), then set their `committed` flags (the parent sends this only after
  every block of those rows was written). With
  ``"part": [RANK, SESSION]`` (a sharded recording, `ckpt_tools.store.parts`), set this
  rank's `part_written` flags of `rows` instead; rank 0 then commits every row whose
  flags all hold SESSION;
- ``{"op": "end"}``: end the session (unmap the region, close the lock descriptor);
- ``{"op": "close"}``: exit.

A reply is ``{"id": N}`` or ``{"id": N, "error": "one line"}``. The process dies with its
parent (``PR_SET_PDEATHSIG``, and end of input on its socket), and holds the group's lock
descriptor during a session, so no writer can take the group while a block of a dead
training process is still being written.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import signal
import socket
import sys


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


class _Writer:
    def __init__(self, msg: dict, fds: list[int]):
        import numpy as np
        import zarr

        self.np = np
        self.fds = list(fds)
        extra = {"storage_options": msg["storage_options"]} if msg.get(
            "storage_options") else {}
        self.group = zarr.open_group(msg["store"], path=msg["group"], mode="r+",
                                     zarr_format=3, use_consolidated=False, **extra)
        self.region = mmap.mmap(self.fds[0], msg["region_size"])
        self.arrays: dict = {}
        self.hashers: dict = {}

    def close(self) -> None:
        self.arrays.clear()
        self.group = None
        with contextlib.suppress(BufferError, ValueError):
            self.region.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def array(self, name: str):
        if name not in self.arrays:
            self.arrays[name] = self.group[name]
        return self.arrays[name]

    def write(self, msg: dict) -> None:
        (r0, n_rows), (c0, n_cols) = msg["rows"], msg["cols"]
        block = self.np.ndarray((n_rows, n_cols), self.np.float32, buffer=self.region,
                                offset=msg["offset"])
        self.array(msg["array"])[r0:r0 + n_rows, c0:c0 + n_cols] = block

    def _set_rows(self, name: str, rows, values) -> None:
        array = self.array(name)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        current = self.np.asarray(array[lo:hi])
        current[rows - lo] = values
        array[lo:hi] = current

    def hash(self, msg: dict) -> dict:
        if sys.byteorder != "little":  # the hash is over little-endian float32
            raise RuntimeError("row hashes are computed on little-endian machines only")
        digests = {}
        with memoryview(self.region) as region:
            for r in msg["rows"]:
                row = msg["first"] + r
                h = hashlib.sha256() if msg["start"] else self.hashers.pop(row)
                for offset, width in msg["parts"]:
                    h.update(region[offset + r * width * 4:offset + (r + 1) * width * 4])
                if msg["final"]:
                    digests[str(row)] = h.hexdigest()
                else:
                    self.hashers[row] = h
        return {"digests": digests}

    def commit(self, msg: dict) -> None:
        rows = self.np.asarray(msg["rows"], dtype=self.np.int64)
        if rows.size == 0:
            return
        for name, values in msg.get("scalars", {}).items():
            self._set_rows(name, rows, self.np.asarray(values, dtype=self.np.float64))
        if msg.get("hashes"):
            digests = [self.np.frombuffer(bytes.fromhex(h), self.np.uint8) for h in msg["hashes"]]
            self._set_rows("row_hash", rows, self.np.stack(digests))
        if msg.get("batch"):
            ids = self.np.full((rows.size, self.array("batch").shape[1]), -1, self.np.int64)
            for i, row_ids in enumerate(msg["batch"]):
                if row_ids:
                    ids[i, :len(row_ids)] = row_ids
            self._set_rows("batch", rows, ids)
        if msg.get("part") is not None:
            self._commit_part(rows, *msg["part"])
            return
        self._set_rows("committed", rows, True)  # last: the rows become visible

    def _commit_part(self, rows, rank: int, session: int) -> None:
        # As ckpt_tools.store.parts (this process does not import ckpt_tools).
        flags = self.array("part_written")
        lo, hi = int(rows.min()), int(rows.max()) + 1
        column = self.np.asarray(flags[lo:hi, rank], dtype=self.np.int64)
        column[rows - lo] = session
        flags[lo:hi, rank] = column
        if rank != 0:
            return
        done = self.np.asarray(self.array("committed")[:], dtype=bool)
        ready = self.np.flatnonzero((self.np.asarray(flags[:]) == session).all(axis=1) & ~done)
        if ready.size:
            self._set_rows("committed", ready, True)


def main(argv: list[str]) -> int:
    """Serve sessions until ``close`` or end of input; see the module docstring."""
    config = json.loads(argv[1])
    # Ctrl-C is for the training process, which stops at a step boundary and then
    # closes the writers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(config["parent"]))
    import numcodecs.blosc
    import zarr

    with contextlib.suppress(OSError):  # after the imports: start at full speed
        os.setpriority(os.PRIO_PROCESS, 0, int(config.get("nice", 10)))
    numcodecs.blosc.set_nthreads(1)  # one core per writer: add writers to scale
    zarr.config.set({"threading.max_workers": 1})
    sock = socket.socket(fileno=config["sock_fd"])
    session = None
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        except OSError:
            break
        if not data:  # the training process has gone
            break
        msg = json.loads(data)
        if msg["op"] == "close":
            break
        reply = {"id": msg.get("id", -1)}
        try:
            if msg["op"] == "open":
                if session is not None:
                    session.close()
                    session = None
                session = _Writer(msg, fds)
            elif msg["op"] == "end":
                if session is not None:
                    session.close()
                session = None
            else:
                reply.update(getattr(session, msg["op"])(msg) or {})
        except BaseException as exc:  # reported to the training process, which names it
            reply["error"] = _describe(exc)
            for fd in fds if msg["op"] == "open" and session is None else ():
                with contextlib.suppress(OSError):
                    os.close(fd)
        sock.send(json.dumps(reply).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
