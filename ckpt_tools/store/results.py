"""Analysis results inside a store: one small Dataset per (history, analysis).

Where a result lives: the analyses of the history ``train`` at ``analyses/<name>``, those
of any other history ``G`` at ``analyses/G/<name>`` (e.g. ``analyses/imp/level_1/
telemetry``). The group's ``attrs["ckpt_tools"]`` says ``kind="analysis"``, the analysis
name, the history ``group`` it was computed from, when, and with which ckpt-tools version.

A write replaces a result whole or not at all: the Dataset is written into a staging
directory inside the store (``.staging/``, no ``zarr.json``, so Zarr, xarray and
`check_store` never see it), then swapped into place with one atomic exchange of
directories (``renameat2(RENAME_EXCHANGE)``; two renames where the file system lacks it),
and the consolidated metadata is rewritten. An interrupted write leaves the previous
result as it was; what it left in ``.staging/`` is removed by the next write.

Object storage has no rename. There the result group ``analyses/<name>`` is a pointer:
the Dataset is written under a fresh prefix ``analyses/<name>/<version>/`` (a new random
version each time), then one small write of the result group's ``zarr.json`` names it
(``attrs["ckpt_tools"]["current"]``), the metadata is consolidated, and only then are
older versions deleted. Readers follow the pointer; until it is written they read the
previous version, which is still whole.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ckpt_tools.store.layout import ATTRS_KEY, StoreError, check_group_name, to_json_safe
from ckpt_tools.store.location import Location, as_location, translate
from ckpt_tools.store.lock import lock_for
from ckpt_tools.store.reader import history_groups, read_root
from ckpt_tools.store.walk import groups_of_kind
from ckpt_tools.store.writer import consolidate

__all__ = ["RESULTS", "list_results", "read_result", "result_path", "write_result"]

RESULTS = "analyses"
"""The group that holds every analysis result."""

_STAGING = ".staging"
_DEFAULT_GROUP = "train"


def result_path(name: str, group: str = _DEFAULT_GROUP) -> str:
    """The group path of the result `name` of the history `group` inside a store.

    Raises:
        StoreError: `name` is not one plain part, or `group` is not a valid group path.
    """
    check_group_name(group)
    if "/" in name:
        raise StoreError(f"invalid analysis name {name!r}: one part, no '/'")
    check_group_name(name)
    return f"{RESULTS}/{name}" if group == _DEFAULT_GROUP else f"{RESULTS}/{group}/{name}"


def _plain(ds: xr.Dataset) -> xr.Dataset:
    """Text as variable-length UTF-8 (the only string type with a Zarr v3 specification)."""
    text = np.dtypes.StringDType()
    out = ds.copy()
    for name, var in ds.variables.items():
        if var.dtype.kind in "UO":
            out[name] = var.copy(data=np.asarray(var.values, dtype=str).astype(text))
    for var in out.variables.values():
        var.encoding = {}
    return out


def _check_nesting(root: zarr.Group, target: str) -> None:
    """Refuse a result whose node would contain, or sit inside, another result."""
    for found in _walk(root):
        if found.startswith(target + "/") or target.startswith(found + "/"):
            raise StoreError(
                f"result '{target}' would nest with the existing result '{found}'; "
                "rename the history group or the analysis"
            )


def _walk(root: zarr.Group) -> list[str]:
    return groups_of_kind(RESULTS, root[RESULTS], "analysis") if RESULTS in root else []


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(staged: Path, final: Path) -> None:
    if not final.exists():
        os.rename(staged, final)
    elif _exchange(staged, final):
        shutil.rmtree(staged)  # now holds the previous result
    else:
        old = staged.with_name(staged.name + "-old")
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old)


def _ensure_parents(path: Location, target: str) -> None:
    group = zarr.open_group(path.open_target(read_only=False), mode="r+", zarr_format=3,
                            use_consolidated=False)
    for part in target.split("/")[:-1]:
        group = group[part] if part in group else group.create_group(part)
        if group.attrs.get(ATTRS_KEY, {}).get("kind") == "analysis":
            raise StoreError(f"cannot store a result inside the result '{group.path}'")


def write_result(
    path: str | Path | Location,
    name: str,
    result: xr.Dataset,
    *,
    group: str = _DEFAULT_GROUP,
    attrs: Mapping | None = None,
) -> str:
    """Write (or replace whole) the result `name` of the history `group`.

    `result`'s own ``attrs["ckpt_tools"]`` are kept and completed with ``kind``,
    ``analysis``, ``group``, ``created`` and ``version``, plus `attrs`.

    Returns:
        The result's group path inside the store, e.g. ``"analyses/telemetry"``.

    Raises:
        StoreError: the store or the history is missing, another process is writing
            results, or the result would nest inside another one. The previous result,
            if any, is then unchanged.
    """
    from ckpt_tools.provenance import version

    path = as_location(path)
    path.require_writable()
    target = result_path(name, group)
    root = read_root(path)
    if group not in history_groups(path):
        raise StoreError(f"{path} has no recorded history '{group}' to store results for")
    _check_nesting(root, target)
    meta = dict(result.attrs.get(ATTRS_KEY, {}))
    meta.update(attrs or {})
    meta.update(kind="analysis", analysis=name, group=group, version=version(),
                created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    ds = _plain(result)
    ds.attrs = {**result.attrs, ATTRS_KEY: to_json_safe(meta)}
    with lock_for(path.child(RESULTS), f"the results of {path}"):
        if not path.is_local:
            _publish(path, target, ds)
            return target
        staging = path.path / _STAGING
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of interrupted writes
        staging.mkdir()
        staged = staging / uuid.uuid4().hex
        try:
            ds.to_zarr(os.fspath(staged), mode="w-", zarr_format=3, consolidated=False)
            _ensure_parents(path, target)
            _swap_into_place(staged, path.path / target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        consolidate(path)
    return target


def _publish(path: Location, target: str, ds: xr.Dataset) -> None:
    """Object storage: write `ds` under a fresh version prefix, then point `target` at it."""
    version = f"v{uuid.uuid4().hex}"
    with translate(path):
        ds.to_zarr(path.child(f"{target}/{version}").zarr_store(read_only=False), mode="w-",
                   zarr_format=3, consolidated=False)
        _ensure_parents(path, target)
        pointer = {"zarr_format": 3, "node_type": "group", "attributes": {
            ATTRS_KEY: {**ds.attrs[ATTRS_KEY], "current": version}}}
        path.fs.pipe_file(f"{path.fs_path}/{target}/zarr.json", json.dumps(pointer).encode())
        consolidate(path)
        old = [e for e, is_dir in path.child(target).listdir() if is_dir and e != version]
        for entry in old:  # older versions and what interrupted writes left
            path.remove(f"{target}/{entry}", recursive=True)
        if old:
            consolidate(path)


def _data_group(root: zarr.Group, target: str) -> str:
    """Where a result's arrays are: the result group, or the version its pointer names."""
    current = root[target].attrs.get(ATTRS_KEY, {}).get("current")
    if current is None:
        return target
    check_group_name(current)
    return f"{target}/{current}"


def read_result(path: str | Path, name: str, *, group: str = _DEFAULT_GROUP) -> xr.Dataset:
    """The stored result `name` of the history `group`, loaded into memory.

    Raises:
        StoreError: no such result in the store (the message lists those stored).
    """
    target = result_path(name, group)
    root = read_root(path)
    if target not in _walk(root):
        stored = ", ".join(r["path"] for r in list_results(path)) or "none"
        raise StoreError(f"{path} has no result '{target}' (stored: {stored}); run "
                         "`ckpt analyze` first")
    path = as_location(path)
    with translate(path), xr.open_zarr(path.open_target(read_only=True),
                                       group=_data_group(root, target), consolidated=False,
                                       chunks=None) as ds:
        return ds.load()


def list_results(path: str | Path) -> list[dict]:
    """Every stored result: ``{"path", "analysis", "group", "created"}`` per result.

    Raises:
        StoreError: if `path` is not a readable ckpt-tools store.
    """
    root = read_root(path)
    out = []
    for found in _walk(root):
        meta = root[found].attrs.get(ATTRS_KEY, {})
        out.append({"path": found, "analysis": meta.get("analysis"),
                    "group": meta.get("group"), "created": meta.get("created")})
    return out
