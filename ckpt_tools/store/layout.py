"""Constants of the on-disk format, its codecs and the errors a store raises.

The format is documented in ``docs/store-format.md``; this module is its single source.
"""

from __future__ import annotations

import json
import math
import re
from enum import StrEnum

from zarr.codecs import BloscCodec, TransposeCodec

__all__ = [
    "ATTRS_KEY",
    "CHUNK_STEPS",
    "FORMAT_VERSION",
    "PARAM_CHUNK",
    "SHARD_AFTER",
    "SHARD_BYTES",
    "Codec",
    "StoreError",
    "check_codec",
    "check_group_name",
    "check_name",
    "codec_of",
    "lossless_compressor",
    "raw_compressor",
    "row_array_layout",
    "time_major",
]

FORMAT_VERSION = 2
"""Bumped whenever a reader of the previous version could misread a new store.

Format 2 (``docs/store-format.md``): `params` and `buffers` of big models are sharded,
and chunks may be stored uncompressed (``codec="none"``) until `ckpt compact`.
"""

ATTRS_KEY = "ckpt_tools"
"""Every attribute the toolkit writes lives under this one key of a group's attributes."""

CHUNK_STEPS = 16
"""Checkpoints per chunk along `step`: neighbouring checkpoints share sign, exponent and
high mantissa bits, so compressing them together (time as the fastest axis) gains ~15%."""

PARAM_CHUNK = 1 << 18
"""Elements per chunk along `param`/`buffer` (16 steps x 2**18 x 4 B = 16 MiB)."""


SHARD_AFTER = 4
"""Row arrays with more chunks than this along `param` per time block are sharded."""

SHARD_BYTES = 1 << 29
"""Raw bytes of one shard at most (512 MiB: a 1B-parameter row is 8 files, not 3,815).

A shard is the smallest unit a writer can write without rewriting it, and Zarr holds
about twice the raw size of one write while encoding it (`bench/shards.py`), so a
writer with a smaller host-memory budget passes a smaller value."""


class Codec(StrEnum):
    """How the chunks of `params` and `buffers` are stored (both exact).

    ``lz4``: blosc LZ4 level 5 with bit shuffle, the default. ``none``: uncompressed
    chunks (blosc frames at level 0), for training that needs every CPU cycle;
    `ckpt compact` turns them into ``lz4`` later, in place.
    """

    lz4 = "lz4"
    none = "none"


class StoreError(ValueError):
    """A store is missing, malformed, from another model, or refuses the operation.

    The message is one line that says what is wrong and what to do: ``problem``, then
    ``hint`` after a semicolon when there is one. The hint is data, so a caller that knows
    a better next step replaces it (`with_hint`) instead of editing the text.

    Attributes:
        problem: What is wrong.
        hint: What to do about it, or None.
    """

    def __init__(self, problem: str, *, hint: str | None = None):
        super().__init__(problem if hint is None else f"{problem}; {hint}")
        self.problem = problem
        self.hint = hint

    def with_hint(self, hint: str | None) -> StoreError:
        """The same problem with another hint."""
        return type(self)(self.problem, hint=hint)


_GROUP_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")


def check_group_name(name: str) -> str:
    """Validate a group path inside a store (no ``..``, no absolute paths, no odd bytes).

    Raises:
        StoreError: if the name could address anything outside the store.
    """
    if not isinstance(name, str) or not _GROUP_RE.match(name) or ".." in name.split("/"):
        raise StoreError(
            f"invalid group name {name!r}: use letters, digits, '_', '-', '.' and '/' "
            "between parts (no leading '/', no '..')"
        )
    return name


_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def check_name(name: str) -> str:
    """Validate an array name inside a group (one plain part: no ``/``, no ``..``).

    Raises:
        StoreError: if the name could address anything outside its group.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise StoreError(
            f"invalid array name {name!r}: use letters, digits, '_', '-' and '.'"
        )
    return name


def lossless_compressor() -> BloscCodec:
    """Blosc LZ4 with bit shuffle over 4-byte words: standard Zarr v3, exact.

    LZ4 rather than zstd: on time-major chunks it stores ~10% more bytes but encodes
    about 3.5x and decodes about 3x faster, which is what recording every step on the
    training machine's own cores, and analysing at read bandwidth, need.
    """
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4)


def raw_compressor() -> BloscCodec:
    """Blosc at level 0: the chunk's bytes as they are, behind a 16-byte blosc header.

    Blosc frames describe themselves (the header says how the bytes were stored), so a
    reader decodes a level-0 frame and an LZ4 frame alike whichever blosc settings the
    array's metadata names. That is what lets `compact` re-encode an array's chunks one
    at a time, in place, while every reader keeps seeing the same values.
    """
    return BloscCodec(cname="lz4", clevel=0, shuffle="noshuffle", typesize=4)


def check_codec(codec: str) -> Codec:
    """Parse a codec name (``"lz4"`` or ``"none"``).

    Raises:
        StoreError: for any other name.
    """
    try:
        return Codec(codec)
    except ValueError:
        raise StoreError(f"unknown codec {codec!r}: use "
                         f"{' or '.join(c.value for c in Codec)}") from None


def codec_of(codecs: list) -> str:
    """The `Codec` that an array's metadata codec list (JSON) names.

    Returns ``"lz4"``, ``"none"`` (blosc at level 0), another blosc compressor's name,
    or ``"-"`` when there is no blosc codec.
    """
    for codec in codecs:
        if not isinstance(codec, dict):
            continue
        conf = codec.get("configuration") or {}
        if codec.get("name") == "sharding_indexed":
            return codec_of(conf.get("codecs") or [])
        if codec.get("name") == "blosc":
            return Codec.none.value if conf.get("clevel") == 0 else str(conf.get("cname"))
    return "-"


def row_array_layout(
    n_elements: int,
    chunk_steps: int,
    *,
    codec: str = Codec.lz4,
    format_version: int = FORMAT_VERSION,
    shard_bytes: int = SHARD_BYTES,
) -> dict:
    """Chunking and codecs of a `(step, x)` array of float32 rows (`params`, `buffers`).

    Chunks are `chunk_steps` checkpoints by up to `PARAM_CHUNK` elements, time-major.
    In format 2, an array with more than `SHARD_AFTER` chunks along `x` is sharded: a
    shard spans one time block (never several: a shard is rewritten whole on every
    write) and as many chunks along `x` as fit in `shard_bytes`.

    Returns:
        Keyword arguments for `zarr.Group.create_array`: ``chunks``, ``shards``,
        ``filters``, ``compressors``.
    """
    width = min(max(n_elements, 1), PARAM_CHUNK)
    per_block = math.ceil(max(n_elements, 1) / width)
    per_shard = min(per_block, max(shard_bytes // (chunk_steps * width * 4), 1))
    sharded = format_version >= 2 and per_block > SHARD_AFTER and per_shard > 1
    compressor = raw_compressor() if check_codec(codec) is Codec.none else lossless_compressor()
    return {
        "chunks": (chunk_steps, width),
        "shards": (chunk_steps, per_shard * width) if sharded else None,
        "filters": [time_major()],
        "compressors": [compressor],
    }


def time_major() -> TransposeCodec:
    """Lay each `(step, x)` chunk out with `step` fastest before compressing it."""
    return TransposeCodec(order=(1, 0))


def to_json_safe(value):
    """Round-trip `value` through JSON so only plain types reach the attributes."""
    return json.loads(json.dumps(value, default=str))
