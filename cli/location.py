"""Where a command's store is: a path or a URL, plus ``--storage-options JSON``."""

from __future__ import annotations

from typing import Annotated

import typer

from ckpt_tools.store import Location, as_location, parse_storage_options

__all__ = ["StorageOptions", "store_location"]

StorageOptions = Annotated[str | None, typer.Option(
    "--storage-options",
    help="JSON object of options for a URL store's file system (s3fs: endpoint_url, key, "
         "secret, client_kwargs, ...), on top of the AWS_* environment variables.",
)]
"""The ``--storage-options`` option every command that takes a store has."""


def store_location(where: str, storage_options: str | None) -> Location:
    """The `Location` of a command's store argument (a path or a URL).

    Raises:
        LocationError: options that are not a JSON object, or given for a local path.
    """
    return as_location(where, parse_storage_options(storage_options))
