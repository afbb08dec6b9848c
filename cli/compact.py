"""`ckpt compact RUN.zarr`: compress histories recorded with ``--codec none``, in place."""

from __future__ import annotations

from typing import Annotated

import typer

from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.location import StorageOptions, store_location
from ckpt_tools.store.compact import compact_store

__all__ = ["compact"]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@friendly
def compact(
    store: Annotated[str, typer.Argument(help="A recorded store (RUN.zarr) on local disk.")],
    group: Annotated[str | None, typer.Option(
        help="One history group (default: every history in the store).",
    )] = None,
    storage_options: StorageOptions = None,
) -> None:
    """Compress the uncompressed histories of a store in place, chunk by chunk.

    Safe to interrupt at any moment (the history reads the same before, during and
    after); run the same command again to continue. Needs free disk for one chunk.
    """
    where = store_location(store, storage_options)
    if not where.is_local:
        raise fail(f"ckpt compact rewrites chunks in place on local disk; {store} is not "
                   "local: compact a local copy, then upload it", USAGE)
    try:
        reports = compact_store(store, None if group is None else [group])
    except KeyboardInterrupt:
        raise fail(f"interrupted; {store} reads as before; run `ckpt compact {store}` again "
                   "to finish", 130) from None
    except OSError as exc:  # a full disk, a read-only file system
        raise fail(f"compacting {store} failed: {exc}; it reads as before; fix that and run "
                   f"`ckpt compact {store}` again") from None
    done = [r for r in reports if r.arrays]
    for r in done:
        typer.echo(f"{r.group}: {', '.join(r.arrays)} compressed, {r.files} files, "
                   f"{_mib(r.bytes_before)} -> {_mib(r.bytes_after)} in {r.seconds:.1f} s"
                   + (" (continued an interrupted compaction)" if r.resumed else ""))
    if not done:
        typer.echo(f"{store}: nothing to compact (every history is compressed)")
