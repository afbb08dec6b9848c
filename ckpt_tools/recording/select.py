"""Which tensors to record: `include`/`exclude` glob patterns on tensor names."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Sequence

from ckpt_tools.tensors import TensorSpec

__all__ = ["patterns", "select"]


def patterns(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """Normalise patterns: None stays None; a string may hold several, comma-separated."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = tuple(p.strip() for item in items for p in str(item).split(",") if p.strip())
    return out or None


def select(
    specs: Sequence[TensorSpec],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
) -> list[TensorSpec]:
    """The tensors whose names match `include` (all when None) and not `exclude`.

    Patterns are `fnmatch` globs matched against the whole name, case-sensitively
    (``*attn*``, ``layer1.*.weight``). Offsets are laid out again, end to end, over the
    selected tensors only.
    """
    out, offset = [], 0
    for spec in specs:
        if include is not None and not any(fnmatch.fnmatchcase(spec.name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(spec.name, p) for p in exclude):
            continue
        out.append(dataclasses.replace(spec, offset=offset))
        offset += spec.size
    return out
