"""How much host memory recording may hold, and the block layout that follows from it.

A recorded row is the model's parameters, buffers and gradient norms as one float32 row
per step, written to three store arrays (`params`, `buffers`, `grad_norm`). Each array is
cut along its columns into *pieces* that match its storage chunks, so every chunk is
written by one writer process, whole. The recording pipeline holds `slots` shared-memory
blocks of `rows` steps each (one being filled while the writers drain the other), plus, in
every writer process, the interpreter and its working copies of one piece while it
compresses it. `plan` picks the most steps per block (16 when they fit, down to 1) whose
total stays within the budget; a model whose single row does not fit is streamed: each
row is handed over in several segments of pieces, one after another.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Piece", "Plan", "default_host_memory", "format_bytes", "parse_bytes", "plan"]

MAX_ROWS = 16
"""Steps per block (and per storage chunk) when memory allows: see `CHUNK_STEPS`."""

SLOTS = 2
"""Shared-memory blocks: one filled by the training thread while the writers drain one."""

WRITER_BASE = 64 << 20
"""Bytes of one writer process before it touches a block (interpreter, numpy, zarr)."""

WRITER_COPIES = 3
"""Working copies of a piece while a writer compresses it (gathered, transposed, encoded)."""

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string with a binary unit (``"2GiB"``, ``"512 MiB"``).

    Raises:
        ValueError: not a positive size (one line, with the accepted forms).
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE_RE.match(str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"invalid memory size {value!r}: give bytes or a number with "
                             "KiB, MiB, GiB or TiB, e.g. 2GiB")
        number = int(float(match.group(1)) * _UNITS[unit])
    if number <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return number


def format_bytes(n: int) -> str:
    """``1.5 GiB``-style text (binary units)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def default_host_memory() -> int:
    """A quarter of the machine's RAM, at most 4 GiB."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return min(ram // 4, 4 << 30)


@dataclass(frozen=True)
class Piece:
    """Columns `start:stop` of store array `array`: one storage chunk's width."""

    array: str
    start: int
    stop: int

    @property
    def width(self) -> int:
        """Number of columns."""
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """The block layout of one recording.

    Attributes:
        rows: Steps per block; a block never spans two storage chunks along `step`.
        segments: The pieces of a row, grouped into segments handed over one after another
            (one segment, the whole row, unless the row is streamed).
        slots: Shared-memory blocks.
        slot_floats: float32 elements per block.
        writers: Writer processes.
        budget: The host-memory budget in bytes.
        need: Bytes the layout may hold at most (shared blocks plus writers).
    """

    rows: int
    segments: tuple[tuple[Piece, ...], ...]
    slots: int
    slot_floats: int
    writers: int
    budget: int
    need: int


def _pieces(widths: Mapping[str, int], units: Mapping[str, int]) -> list[Piece]:
    # Pieces are cut at storage units (chunks, or shards when the array is sharded).
    out = []
    for name, width in widths.items():
        unit = max(int(units.get(name, width) or 1), 1)
        out += [Piece(name, lo, min(lo + unit, width)) for lo in range(0, width, unit)]
    return out


def _need(rows: int, slot_floats: int, widest: int, writers: int) -> int:
    return SLOTS * slot_floats * 4 + writers * (WRITER_BASE + WRITER_COPIES * rows
                                                      * widest * 4)


def plan(
    widths: Mapping[str, int],
    units: Mapping[str, int] | Callable[[int], Mapping[str, int]],
    *,
    budget: int,
    writers: int,
    max_rows: int = MAX_ROWS,
    chunk: int | None = None,
    what: str = "this model",
) -> Plan:
    """The most steps per block that fit `budget`, streaming rows that do not fit whole.

    Args:
        widths: Columns per store array (``{"params": n, "buffers": m, "grad_norm": k}``).
        units: Columns per storage unit (chunk or shard) of each array; pieces are cut at
            these. A function of the steps per block when the unit depends on it.
        budget: Host-memory budget in bytes.
        writers: Writer processes.
        max_rows: Upper bound on steps per block.
        chunk: The stored chunk length along `step` when continuing a store: blocks then
            take a divisor of it, so that none spans two chunks.
        what: How the error message names the model.

    Raises:
        ValueError: even one row's narrowest streamed segment does not fit; the message
            names the smallest budget that works.
    """
    def cut(rows: int) -> list[Piece]:
        return _pieces(widths, units(rows) if callable(units) else units)

    total = sum(widths.values())
    for rows in range(min(max_rows, chunk or max_rows), 0, -1):
        if chunk and chunk % rows:
            continue
        pieces = cut(rows)
        widest = max((p.width for p in pieces), default=1)
        need = _need(rows, rows * total, widest, writers)
        if need <= budget:
            return Plan(rows, (tuple(pieces),), SLOTS, rows * total, writers, budget, need)
    pieces = cut(1)
    widest = max((p.width for p in pieces), default=1)
    # Stream: one step per block, as many whole pieces per segment as fit.
    room = (budget - writers * (WRITER_BASE + WRITER_COPIES * widest * 4)) // (SLOTS * 4)
    if room < widest:
        smallest = _need(1, widest, widest, writers)
        raise ValueError(
            f"host_memory={format_bytes(budget)} cannot hold one recorded row of {what} "
            f"with {writers} writer process(es) ({widest * 4 / 2**20:.1f} MiB per chunk "
            f"column); the smallest budget that works is {-(-smallest // (1 << 20))} MiB"
        )
    segments, current, used = [], [], 0
    for piece in pieces:
        if current and used + piece.width > room:
            segments.append(tuple(current))
            current, used = [], 0
        current.append(piece)
        used += piece.width
    segments.append(tuple(current))
    slot = max(sum(p.width for p in seg) for seg in segments)
    return Plan(1, tuple(segments), SLOTS, slot, writers, budget, _need(1, slot, widest, writers))
