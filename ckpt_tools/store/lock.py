"""One writer per history group: an advisory lock file inside the group's directory.

The lock is ``<group>/.lock``, held with ``fcntl.flock`` for as long as a writer has the
group open, and holding a JSON line that names the holder (pid, host, start time,
command). The kernel drops a flock when its process dies, however it dies, so a lock
left by a killed writer is free to take; the next writer finds the dead holder's line
in the file, reports it as recovered and writes its own. On release the file is removed,
so a store that nobody writes holds no lock files.

Readers never lock: committed flags make concurrent reading safe. Zarr ignores files
that are not part of its hierarchy (an unconsolidated listing warns about them; the
consolidated metadata that ckpt-tools and xarray read does not list them at all).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import platform
import sys
from pathlib import Path

from ckpt_tools.store.layout import StoreError
from ckpt_tools.store.location import Location, as_location

__all__ = ["LOCK_NAME", "GroupLock", "holder_of", "lock_for"]

LOCK_NAME = ".lock"
"""File name of a group's lock, inside the group's directory."""

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    where = holder.get("host", "?")
    alive = ""
    if where == platform.node() and isinstance(holder.get("pid"), int):
        alive = "" if _pid_alive(holder["pid"]) else " (not running; a child of it may be)"
    return (f"pid {holder.get('pid', '?')} on {where}{alive}, since {holder.get('since', '?')}"
            f" ({holder.get('command', '?')})")


def holder_of(lock_path: str | Path) -> dict:
    """The holder line of a lock file ({} when missing, empty or unreadable)."""
    try:
        text = Path(lock_path).read_text()
        value = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class GroupLock:
    """Exclusive lock on one group directory of a store.

    Args:
        group_dir: The group's directory (created if missing).
        label: How refusals name the group, e.g. ``"group 'train' in run.zarr"``.

    Attributes:
        recovered: The holder line of a lock left behind by a process that died without
            releasing it ({} when the lock was free and clean).
    """

    def __init__(self, group_dir: str | Path | Location, label: str):
        group_dir = group_dir.path if isinstance(group_dir, Location) else group_dir
        self.path = Path(group_dir) / LOCK_NAME
        self.label = label
        self.recovered: dict = {}
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> GroupLock:
        """Take the lock or refuse.

        Raises:
            StoreError: another live writer holds it (the message names the holder).
        """
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(
                    f"{self.label} is being written by {_describe(holder_of(self.path))}; "
                    "wait for it to finish or stop it first"
                ) from None
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                self._check_by_pid(fd)
            # The file may have been removed by its previous holder between our open and
            # our flock; then we hold a lock on a file nobody else can see: try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = holder_of(self.path)
        if previous and previous.get("pid") != os.getpid():
            self.recovered = previous
        line = json.dumps({
            "pid": os.getpid(),
            "host": platform.node(),
            "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(Path(a).name if i == 0 else a
                                for i, a in enumerate(sys.argv[:4])) or "python",
        })
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)
        self._fd = fd
        return self

    def fileno(self) -> int | None:
        """The held lock's file descriptor (a process that inherits it shares the lock)."""
        return self._fd

    def _check_by_pid(self, fd: int) -> None:
        # File systems without flock: trust a holder line whose process is alive.
        holder = holder_of(self.path)
        pid, host = holder.get("pid"), holder.get("host")
        live = isinstance(pid, int) and (host != platform.node() or _pid_alive(pid))
        if live and pid != os.getpid():
            os.close(fd)
            raise StoreError(f"{self.label} is being written by {_describe(holder)}; "
                             "wait for it to finish or stop it first")

    def check(self) -> None:
        """Nothing to check: the kernel holds a flock for as long as the process lives."""

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(fd)

    def __enter__(self) -> GroupLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        # An abandoned writer must not keep its group locked for the process's lifetime.
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def lock_for(group: str | Path | Location, label: str):
    """The writer lock of a group: `GroupLock` (flock) locally, `LeaseLock` in object storage."""
    group = as_location(group)
    group.require_writable()
    if group.is_local:
        return GroupLock(group.path, label)
    from ckpt_tools.store.lease import LeaseLock

    return LeaseLock(group, label)
