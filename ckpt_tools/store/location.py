"""Where a store lives: a local directory or a URL, and the one place that opens it.

A `Location` is a small frozen value, ``(url, storage_options)``: a local path
(``runs/run.zarr``), an ``s3://bucket/prefix/run.zarr`` URL, or any other fsspec URL
(``https://host/run.zarr``, read-only). It pickles as those two fields, so a child process
or a dask worker opens the same store itself. Every part of the store package that reads
or writes (reader, writer, lock, results, safety checks, sizes) goes through it.

Object stores need the ``s3`` extra (``pip install ckpt-tools[s3]``); s3fs is imported
only when an ``s3://`` location is first opened. Credentials and the endpoint come from
the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``), overridden by `storage_options` (s3fs's own keyword
arguments, e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_tools.store.layout import StoreError

__all__ = ["Location", "LocationError", "as_location", "parse_storage_options", "translate"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_WRITABLE = frozenset({"s3", "s3a"})
_S3 = frozenset({"s3", "s3a"})


class LocationError(StoreError):
    """A store's location cannot be used (no bucket, no credentials, no endpoint, read-only).

    Also a malformed URL or options. The command line reports it as a usage error (exit status 2).
    """


@dataclass(frozen=True)
class Location:
    """A store's place: a local path or a URL, with the options to open it.

    Attributes:
        url: A local path (as given) or a URL with a scheme (``s3://bucket/run.zarr``).
        storage_options: Keyword arguments for the fsspec file system of a URL (for
            s3fs: ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ...).
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.storage_options, Mapping):
            raise LocationError("storage options must be a JSON object, e.g. "
                                '\'{"endpoint_url": "http://127.0.0.1:9000"}\'')
        if self.storage_options and self.is_local:
            raise LocationError(f"storage options apply to URLs (s3://...), not to the local "
                                f"path {self.url}; drop them")

    def __repr__(self) -> str:  # never print credentials
        keys = ", ".join(sorted(self.storage_options))
        return f"Location({self.url!r}" + (f", storage_options keys: {keys})" if keys else ")")

    def __str__(self) -> str:
        return self.url

    # -- what it is --------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        """``"file"`` for local paths, else the URL's scheme (``"s3"``, ``"https"``)."""
        match = _URL.match(self.url)
        return match.group(1).lower() if match else "file"

    @property
    def is_local(self) -> bool:
        """Whether the store is a directory on this machine's file system."""
        return self.protocol == "file"

    @property
    def writable(self) -> bool:
        """Whether ckpt-tools can write here: local paths and ``s3://`` URLs."""
        return self.is_local or self.protocol in _WRITABLE

    @property
    def path(self) -> Path:
        """The local directory (only for local locations)."""
        if not self.is_local:
            raise LocationError(f"{self.url} is not a local path")
        url = self.url
        return Path(url[len("file://"):] if url.startswith("file://") else url)

    @property
    def name(self) -> str:
        """The last part of the path, e.g. ``run.zarr``."""
        return self.path.name if self.is_local else self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The location one level up (a local directory, or a URL prefix)."""
        if self.is_local:
            return Location(os.fspath(self.path.parent))
        head = self.url.rstrip("/").rsplit("/", 1)[0]
        return Location(head, self.storage_options)

    def child(self, rel: str) -> Location:
        """The location `rel` (a ``/``-separated relative path) inside this one."""
        if not rel:
            return self
        if self.is_local:
            return Location(os.fspath(self.path / rel))
        return Location(f"{self.url.rstrip('/')}/{rel}", self.storage_options)

    def require_writable(self) -> None:
        """Raise `LocationError` unless ckpt-tools can write here."""
        if not self.writable:
            raise LocationError(f"{self.url} is read-only for ckpt-tools (writing is supported "
                                "to local paths and s3:// URLs); copy the store to write to it")

    # -- opening -----------------------------------------------------------------------
    def _fs_kwargs(self, *, asynchronous: bool = False) -> dict:
        opts: dict[str, Any] = {}
        if self.protocol in _S3:
            env = os.environ
            if env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"):
                opts["endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or env["AWS_ENDPOINT_URL"]
            region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            if region:
                opts["client_kwargs"] = {"region_name": region}
            if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
                opts.update(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"])
                if env.get("AWS_SESSION_TOKEN"):
                    opts["token"] = env["AWS_SESSION_TOKEN"]
            # Writers and readers of one store see each other's objects at once.
            opts["use_listings_cache"] = False
        opts.update(self.storage_options)
        if asynchronous:
            opts["asynchronous"] = True
        return opts

    @property
    def fs(self):
        """The fsspec file system of a URL (synchronous; fsspec caches instances)."""
        if self.is_local:
            raise LocationError(f"{self.url} is a local path; use `path`")
        fsspec = _import_fsspec(self.protocol)
        try:
            return fsspec.filesystem(self.protocol, **self._fs_kwargs())
        except (ImportError, ValueError, TypeError) as exc:
            raise LocationError(f"cannot open {self.url}: {_first_line(exc)}") from None

    @property
    def fs_path(self) -> str:
        """The path of the location inside its file system (``bucket/prefix/run.zarr``)."""
        if self.is_local:
            return os.fspath(self.path)
        return self.fs._strip_protocol(self.url).rstrip("/")

    def zarr_store(self, *, read_only: bool):
        """A Zarr store object for the location (what ``zarr.open_group`` takes)."""
        if self.is_local:
            from zarr.storage import LocalStore

            return LocalStore(self.path, read_only=read_only)
        if not read_only:
            self.require_writable()
        from zarr.storage import FsspecStore

        _import_fsspec(self.protocol)
        try:
            return FsspecStore.from_url(self.url, storage_options=self._fs_kwargs(),
                                        read_only=read_only)
        except (ImportError, ValueError, TypeError) as exc:
            raise LocationError(f"cannot open {self.url}: {_first_line(exc)}") from None

    def open_target(self, *, read_only: bool):
        """What ``zarr.open_group``/``xarray.open_zarr`` take: a local path or a store."""
        if self.is_local:
            return os.fspath(self.path)
        return self.zarr_store(read_only=read_only)

    # -- file operations, relative to the location -------------------------------------
    def _key(self, rel: str) -> str:
        return f"{self.fs_path}/{rel}" if rel else self.fs_path

    def exists(self, rel: str = "") -> bool:
        """Whether anything (a file, a directory, a non-empty prefix) is at `rel`."""
        if self.is_local:
            return (self.path / rel).exists()
        with translate(self):
            return bool(self.fs.exists(self._key(rel)))

    def is_file(self, rel: str) -> bool:
        """Whether `rel` is a file (an object)."""
        if self.is_local:
            return (self.path / rel).is_file()
        with translate(self):
            return bool(self.fs.isfile(self._key(rel)))

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of the file `rel` (FileNotFoundError when missing)."""
        if self.is_local:
            return (self.path / rel).read_bytes()
        with translate(self):
            return self.fs.cat_file(self._key(rel))

    def listdir(self, rel: str = "") -> list[tuple[str, bool]]:
        """``(name, is_directory)`` of each entry directly under `rel`."""
        if self.is_local:
            return [(e.name, e.is_dir()) for e in os.scandir(self.path / rel)]
        with translate(self):
            entries = self.fs.ls(self._key(rel), detail=True)
        return [(e["name"].rstrip("/").rsplit("/", 1)[-1], e["type"] == "directory")
                for e in entries]

    def files(self, rel: str = "") -> list[str]:
        """Every file below `rel`, as paths relative to `rel`."""
        if self.is_local:
            base = self.path / rel
            return [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
        base = self._key(rel)
        with translate(self):
            found = self.fs.find(base)
        return [f[len(base) + 1:] for f in found if f.startswith(base + "/")]

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        """Delete the file (or, with `recursive`, the directory tree) `rel`; no-op if missing."""
        if self.is_local:
            import shutil

            target = self.path / rel
            if recursive and target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            return
        key = self._key(rel)
        with translate(self):
            if recursive:
                found = self.fs.find(key)
                if found:
                    self.fs.rm(found)
            elif self.fs.isfile(key):
                self.fs.rm_file(key)

    def size(self, rel: str = "") -> int:
        """Total bytes of every file below `rel`."""
        if self.is_local:
            base = self.path / rel
            return sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
        with translate(self):
            return int(self.fs.du(self._key(rel), total=True))

    def probe(self) -> None:
        """Check that a URL's container is reachable and readable with the credentials.

        Raises:
            LocationError: no such bucket, no credentials, or the endpoint cannot be
                reached (each in one line saying what to fix).
        """
        if self.is_local:
            return
        with translate(self):
            if self.protocol in _S3:
                bucket = self.fs_path.split("/", 1)[0]
                self.fs.ls(bucket)
            else:
                self.fs.exists(self.fs_path)


def as_location(where: str | os.PathLike | Location,
                storage_options: Mapping[str, Any] | None = None) -> Location:
    """The `Location` of a path, URL or `Location` (with `storage_options` merged in).

    Raises:
        LocationError: storage options that are not a mapping, or given for a local path.
    """
    if isinstance(where, Location):
        if storage_options:
            return Location(where.url, {**where.storage_options, **storage_options})
        return where
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise LocationError("storage options must be a JSON object")
    text = os.fspath(where)
    if not _URL.match(text):
        text = os.fspath(Path(text))  # the spelling `Path` gives, as messages always showed
    return Location(text, dict(storage_options or {}))


def parse_storage_options(text: str | None) -> dict:
    """Parse ``--storage-options JSON`` (None: no options).

    Raises:
        LocationError: the text is not a JSON object.
    """
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise LocationError(f"--storage-options is not valid JSON ({exc.msg}); give an object "
                            'such as \'{"endpoint_url": "http://127.0.0.1:9000"}\'') from None
    if not isinstance(value, dict):
        raise LocationError("--storage-options must be a JSON object, e.g. "
                            '\'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    return value


def _import_fsspec(protocol: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with dask
        raise LocationError("URLs need fsspec: pip install 'ckpt-tools[s3]'") from None
    if protocol in _S3:
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise LocationError("s3:// stores need s3fs: pip install 'ckpt-tools[s3]'") from None
    return fsspec


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else exc.__class__.__name__


class translate:  # noqa: N801 - used as a context manager, reads like a function
    """Turn an object store's connection, credential and bucket errors into `LocationError`.

    Other errors (a missing key, a damaged object) pass through unchanged.
    """

    def __init__(self, location: Location):
        self.location = location

    def __enter__(self) -> translate:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, StoreError):
            return False
        problem = describe_failure(self.location, exc)
        if problem is None:
            return False
        raise LocationError(problem) from exc


def describe_failure(location: Location, exc: BaseException) -> str | None:
    """One line for an object store failure that is the location's fault, else None."""
    name = type(exc).__name__
    text = _first_line(exc)
    endpoint = location._fs_kwargs().get("endpoint_url") or "the default AWS endpoint"
    url = location.url
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        return (f"no credentials to access {url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or pass key/secret in --storage-options")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                "ServerDisconnectedError") or "could not connect" in text.lower():
        return (f"cannot reach the object store at {endpoint} for {url}: check "
                "AWS_ENDPOINT_URL or endpoint_url in --storage-options")
    if "bucket does not exist" in text.lower() or "nosuchbucket" in text.lower():
        bucket = location.fs_path.split("/", 1)[0] if not location.is_local else "?"
        return (f"bucket '{bucket}' does not exist at {endpoint} ({url}); create it or fix "
                "the URL")
    if name in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or (
        isinstance(exc, PermissionError)
    ):
        return (f"access to {url} denied ({text}); check the credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the bucket's permissions")
    return None
