"""Writer processes and the sockets to them, kept for reuse within a training process.

Starting a writer costs an interpreter with numpy and zarr (about a second on a busy
machine), so a process that records many short runs (IMP levels, ablations, a test
suite) keeps the writers of a finished `Recorder` for the next one. Each recording is a
*session*: it sends its shared region and the group lock's descriptor with an ``open``
message (``SCM_RIGHTS``), and ends with ``end``, after which the writer holds nothing of
it. A writer whose session failed is stopped, not kept.

Messages are JSON objects, one per `SOCK_SEQPACKET` packet, so boundaries are kept and no
framing is needed; see `ckpt_tools.store.row_writer` for the commands.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading

from ckpt_tools.store import row_writer

__all__ = ["WriterProcess", "give_back", "take"]

_KEEP = 8  # idle writers kept at most


class WriterProcess:
    """A started writer process (`ckpt_tools.store.row_writer`) and its socket."""

    def __init__(self, nice: int = 10):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {"sock_fd": theirs.fileno(), "parent": os.getpid(), "nice": nice}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", row_writer.__file__, json.dumps(config)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
                start_new_session=True,  # a terminal's Ctrl-C goes to the training process
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.proc.pid

    def fileno(self) -> int:
        """The socket's descriptor (for selectors)."""
        return self.sock.fileno()

    def send(self, msg: dict, fds: tuple[int, ...] = ()) -> None:
        """Send one command (with file descriptors to pass, if any)."""
        data = json.dumps(msg).encode()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def recv(self) -> dict | None:
        """One reply, or None when the process has gone (end of input)."""
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            return None
        return json.loads(data) if data else None

    def describe_exit(self, timeout: float = 10.0) -> str:
        """Why the process is gone: its exit status or the signal that killed it."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"writer process {self.pid} stopped answering"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"writer process {self.pid} was killed by {signal.Signals(-code).name}"
            return f"writer process {self.pid} was killed by signal {-code}"
        return f"writer process {self.pid} exited with status {code}"

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the process to exit and wait for it (killing it if it does not)."""
        with contextlib.suppress(OSError):
            self.send({"op": "close"})
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Kill the process now."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            self.sock.close()


_idle: list[WriterProcess] = []
_owner = os.getpid()
_guard = threading.Lock()


def take(n: int) -> list[WriterProcess]:
    """`n` writer processes: idle ones first, then new ones."""
    global _owner
    out = []
    with _guard:
        if _owner != os.getpid():  # a forked child never shares its parent's writers
            _idle.clear()
            _owner = os.getpid()
        while _idle and len(out) < n:
            proc = _idle.pop()
            if proc.alive():
                out.append(proc)
            else:
                proc.kill()
    try:
        while len(out) < n:
            out.append(WriterProcess())
    except BaseException:
        for proc in out:
            proc.kill()
        raise
    return out


def give_back(procs: list[WriterProcess]) -> None:
    """Keep writers whose session ended cleanly for the next recording."""
    with _guard:
        for proc in procs:
            if proc.alive() and len(_idle) < _KEEP and _owner == os.getpid():
                _idle.append(proc)
            else:
                proc.stop()


@atexit.register
def _stop_idle() -> None:
    with _guard:
        if _owner != os.getpid():  # a forked child: the writers are its parent's
            return
        while _idle:
            _idle.pop().stop(timeout=5.0)
