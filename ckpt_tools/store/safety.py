"""Safe to open: a store from a stranger is checked before anything reads it.

A Zarr store is metadata (JSON) plus chunks decoded by the codecs that metadata names.
Opening one is safe when every metadata document is JSON, every codec is a known,
data-only codec (none can run code, as a pickle codec would), and no name or link in it
addresses anything outside the store's directory. `check_store` walks the hierarchy's
metadata (not the chunks) and raises `StoreError` on the first violation; on object
storage it walks the same keys by listing prefixes (there are no links there).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ckpt_tools.store.layout import StoreError
from ckpt_tools.store.location import Location, as_location

__all__ = ["SAFE_CODECS", "SAFE_DATA_TYPES", "check_store", "load_metadata"]

SAFE_CODECS = frozenset({
    "bytes", "endian", "transpose", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed",
    "vlen-utf8", "vlen-bytes",
    *(f"numcodecs.{n}" for n in (
        "blosc", "lz4", "zstd", "zlib", "gzip", "bz2", "lzma", "shuffle", "delta", "bitround",
        "fixedscaleoffset", "quantize", "packbits", "astype", "crc32", "crc32c", "adler32",
        "fletcher32", "jenkins_lookup3", "pcodec", "zfpy",
    )),
})
"""Codecs a store may name: Zarr v3's own and numcodecs' data-only codecs."""

SAFE_DATA_TYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "string", "bytes",
    "variable_length_bytes", "variable_length_utf8",
})

_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def load_metadata(meta_file: Path, location: Location | None = None) -> dict:
    """Parse one ``zarr.json`` (`meta_file` relative to `location` when one is given).

    Raises:
        StoreError: unreadable, not JSON, or not a Zarr v3 node.
    """
    try:
        raw = (location.read_bytes(meta_file.as_posix()) if location is not None
               else meta_file.read_bytes())
        doc = json.loads(raw)
    except StoreError:
        raise
    except (OSError, ValueError) as exc:
        where = location.child(meta_file.as_posix()) if location is not None else meta_file
        raise StoreError(f"{where}: metadata is not valid JSON ({exc.__class__.__name__}); "
                         "the store is damaged") from None
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") not in (
        "group", "array"
    ):
        where = location.child(meta_file.as_posix()) if location is not None else meta_file
        raise StoreError(f"{where}: not Zarr v3 metadata; the store is damaged")
    return doc


def _check_array(doc: dict, where: str) -> None:
    codecs = doc.get("codecs")
    if not isinstance(codecs, list):
        raise StoreError(f"{where}: array metadata without a codec list; the store is damaged")
    for codec in _flatten(codecs):
        name = codec.get("name") if isinstance(codec, dict) else codec
        if not isinstance(name, str) or name not in SAFE_CODECS:
            raise StoreError(f"{where}: refusing to decode codec {name!r} (only data codecs "
                             "are allowed; a store never needs code to be read)")
    dtype = doc.get("data_type")
    name = dtype.get("name") if isinstance(dtype, dict) else dtype
    if not isinstance(name, str) or name not in SAFE_DATA_TYPES:
        raise StoreError(f"{where}: unsupported data type {name!r}")


def _flatten(codecs: list) -> list:
    out = []
    for codec in codecs:
        out.append(codec)
        conf = codec.get("configuration") if isinstance(codec, dict) else None
        if isinstance(conf, dict):  # sharding nests codec lists
            for key in ("codecs", "index_codecs"):
                if isinstance(conf.get(key), list):
                    out.extend(_flatten(conf[key]))
    return out


def _check_key(key: object, where: str) -> None:
    parts = key.split("/") if isinstance(key, str) else [None]
    if not all(isinstance(p, str) and _PART.match(p) and p not in (".", "..") for p in parts):
        raise StoreError(f"{where}: member name {key!r} is not a plain name (letters, "
                         "digits, '_', '-', '.'); refusing a name that could leave the store")


def _inside(path: Path, root: Path | None, where: str) -> None:
    if root is not None and path.is_symlink():
        target = path.resolve()
        if target != root and root not in target.parents:
            raise StoreError(f"{where}: {path.name} links outside the store ({target})")


def check_store(path: str | Path | Location) -> dict:
    """Check every metadata document of the store at `path`; return the root's.

    Raises:
        StoreError: a document is not JSON, names an unsafe codec or data type, or a
            member name or symbolic link leads outside the store.
    """
    loc = as_location(path)
    root = Path(loc.url) if not loc.is_local else loc.path
    real_root = loc.path.resolve() if loc.is_local else None
    root_doc = load_metadata(Path("zarr.json"), loc)
    if root_doc["node_type"] != "group":
        raise StoreError(f"{root} is a Zarr array, not a store of groups")
    consolidated = root_doc.get("consolidated_metadata")
    if isinstance(consolidated, dict):
        entries = consolidated.get("metadata") or {}
        if not isinstance(entries, dict):
            raise StoreError(f"{root}/zarr.json: malformed consolidated metadata")
        for key, doc in entries.items():
            where = f"{root}/zarr.json [{key}]"
            _check_key(key, where)
            if not isinstance(doc, dict):
                raise StoreError(f"{where}: malformed consolidated metadata")
            if doc.get("node_type") == "array":
                _check_array(doc, where)
    stack = [Path()]
    while stack:
        group = stack.pop()
        try:
            entries = loc.listdir(group.as_posix() if group.parts else "")
        except OSError as exc:
            raise StoreError(f"{root / group}: unreadable ({exc.strerror or exc})") from None
        for name, is_dir in entries:
            child = group / name
            _inside(root / child, real_root, str(root / group))
            meta_file = child / "zarr.json"
            if not is_dir or not loc.is_file(meta_file.as_posix()):
                continue
            _check_key(name, str(root / group))
            try:
                doc = load_metadata(meta_file, loc)
            except StoreError:
                if not loc.exists(meta_file.as_posix()):  # removed while we looked (a writer)
                    continue
                raise
            if doc["node_type"] == "group":
                stack.append(child)
            else:
                _check_array(doc, str(root / meta_file))
                _inside(root / child / "c", real_root, str(root / child))
    return root_doc
