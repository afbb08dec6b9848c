"""What every store says about how it was made: versions, git sha, host, time."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["git_sha", "provenance", "version"]


def version() -> str:
    """The installed ckpt-tools version."""
    try:
        return metadata.version("ckpt-tools")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def git_sha(directory: str | Path | None = None) -> str | None:
    """The commit of the git work tree holding `directory` (this package by default).

    A ``+dirty`` suffix marks uncommitted changes; None outside a git work tree.
    """
    where = Path(directory) if directory else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=5,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """Versions of the stack, git sha, host and UTC time, for a store's root attributes."""
    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "ckpt_tools": version(),
            **{name: dist(name) for name in ("torch", "zarr", "xarray", "numpy", "dask")},
            "python": platform.python_version(),
        },
        "git_sha": git_sha(),
        "host": platform.node(),
    }
