"""One writer per group on object storage: a lock object with a lease.

Object stores have no ``flock`` and no rename, but S3 (and moto, MinIO, R2) honour
conditional writes. The lock is the object ``<group>/.lock``:

- **take it**: ``PUT`` with ``If-None-Match: *``; exactly one of several racing writers
  gets it, the others get ``412 Precondition Failed``;
- **hold it**: the object is one JSON line naming the holder (``owner`` id, pid, host,
  start, command) and its ``lease_s``; a thread rewrites it every ``lease_s / 3`` seconds
  with ``If-Match: <our ETag>``, so the lease stays fresh while the writer lives, and a
  failed rewrite means someone else has taken it (the writer then refuses to commit);
- **stale**: a lock whose object was last written more than its ``lease_s`` ago (the
  server's ``Last-Modified`` against this machine's clock), or whose holder is a dead
  process on this host, is taken over with ``PUT If-Match: <its ETag>``: of several
  writers that see the same stale lock, one wins;
- **release**: ``DELETE If-Match: <our ETag>`` (never deletes someone else's lock).

A killed writer's lease runs out after ``lease_s`` (30 s by default); on the same host it
is recovered at once, since its process is gone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import threading
import time
import uuid
from pathlib import Path

from ckpt_tools.store.layout import StoreError
from ckpt_tools.store.location import Location, translate

__all__ = ["LEASE_S", "LeaseLock"]

LEASE_S = 30.0
"""Seconds a lock object stays valid without renewal."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
            f"{holder.get('since', '?')} ({holder.get('command', '?')}; lease "
            f"{holder.get('lease_s', '?')} s)")


class LeaseLock:
    """Exclusive lock on one group of a store in object storage.

    Args:
        group: The group's location (the lock object is ``<group>/.lock``).
        label: How refusals name the group, e.g. ``"group 'train' in s3://b/run.zarr"``.
        lease_s: Seconds the lock stays valid without renewal.
        renew: Renew the lease from a background thread while held.
        name: The lock object's name inside `group`.

    Attributes:
        recovered: The holder line of a stale lock that was taken over ({} otherwise).
    """

    def __init__(self, group: Location, label: str, *, lease_s: float = LEASE_S,
                 renew: bool = True, name: str = ".lock"):
        self.location = group
        self.label = label
        self.lease_s = float(lease_s)
        self.recovered: dict = {}
        self._renew = renew
        self._key = f"{group.fs_path}/{name}"
        self._etag: str | None = None
        self._line: dict = {}
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._etag is not None

    def _holder_line(self) -> bytes:
        return (json.dumps(self._line) + "\n").encode()

    def acquire(self, *, wait_s: float = 0.0) -> LeaseLock:
        """Take the lock, waiting up to `wait_s` seconds for a live holder to let go.

        Raises:
            StoreError: another live writer holds it (the message names the holder).
        """
        if self.held:
            return self
        self._line = {
            "owner": uuid.uuid4().hex,
            "pid": os.getpid(),
            "host": platform.node(),
            "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(Path(a).name if i == 0 else a
                                for i, a in enumerate(sys.argv[:4])) or "python",
            "lease_s": self.lease_s,
        }
        fs = self.location.fs
        deadline = time.monotonic() + wait_s
        with translate(self.location):
            while True:
                try:
                    out = fs.pipe_file(self._key, self._holder_line(), mode="create")
                    self._etag = out["ETag"]
                    break
                except FileExistsError:
                    pass
                holder, etag, age = self._current()
                if etag is None:  # released between our write and our look
                    continue
                if self._stale(holder, age):
                    try:
                        out = fs.pipe_file(self._key, self._holder_line(), IfMatch=etag)
                    except (OSError, FileNotFoundError):  # another writer was quicker
                        continue
                    self._etag, self.recovered = out["ETag"], holder
                    break
                if time.monotonic() >= deadline:
                    raise StoreError(f"{self.label} is being written by {_describe(holder)}; "
                                     "wait for it to finish or stop it first")
                time.sleep(0.05)
        if self._renew:
            self._stop.clear()
            self._thread = threading.Thread(target=self._keep, name="ckpt-lease", daemon=True)
            self._thread.start()
        return self

    def _current(self) -> tuple[dict, str | None, float]:
        """The lock object's holder line, ETag and age in seconds (None ETag: no lock)."""
        fs = self.location.fs
        try:
            info = fs.info(self._key)
            text = fs.cat_file(self._key)
        except FileNotFoundError:
            return {}, None, 0.0
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        modified = info.get("LastModified")
        age = (_dt.datetime.now(_dt.UTC) - modified).total_seconds() if modified else 0.0
        return (holder if isinstance(holder, dict) else {}), info.get("ETag"), age

    def _stale(self, holder: dict, age: float) -> bool:
        lease = holder.get("lease_s")
        lease = float(lease) if isinstance(lease, int | float) else LEASE_S
        if age > lease:
            return True
        pid = holder.get("pid")
        return (holder.get("host") == platform.node() and isinstance(pid, int)
                and pid != os.getpid() and not _pid_alive(pid))

    def _keep(self) -> None:
        fs = self.location.fs
        while not self._stop.wait(self.lease_s / 3):
            etag = self._etag
            if etag is None:
                return
            try:
                out = fs.pipe_file(self._key, self._holder_line(), IfMatch=etag)
            except FileNotFoundError:
                self._lost = "its lock object was removed"
                return
            except OSError as exc:
                if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                    holder, _, _ = self._current()
                    self._lost = f"the lock was taken over by {_describe(holder)}"
                    return
                continue  # a transient failure: try again at the next renewal
            except Exception:  # noqa: BLE001 - keep renewing through transient errors
                continue
            if self._etag is not None:
                self._etag = out["ETag"]

    def check(self) -> None:
        """Raise `StoreError` if the lease was lost (another writer took the group over)."""
        if self._lost:
            raise StoreError(f"{self.label}: this writer lost its lock ({self._lost}); "
                             "stop it, the other writer owns the group now")

    def release(self) -> None:
        """Stop renewing and delete the lock object if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)  # a renewal in flight changes the ETag
        self._thread = None
        etag, self._etag = self._etag, None
        if etag is None or self._lost:
            return
        bucket, _, key = self._key.partition("/")
        with contextlib.suppress(Exception):  # gone or taken over: nothing of ours to delete
            self.location.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)

    def __enter__(self) -> LeaseLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
