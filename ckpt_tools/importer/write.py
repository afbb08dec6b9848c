"""Stream a checked series into a history group, one storage block at a time.

Memory stays bounded whatever the model's size: the rows of one block of steps (as many
checkpoints as a chunk holds along `step`) are filled column block by column block (a
chunk's width along `param`), each piece read straight from its checkpoint's memory map
or safetensors slice. A block of 16 steps by 2**18 values is 16 MiB; nothing else is
held. Each storage chunk is written once, and a row's content hash is computed from the
same pieces as they pass (see `ckpt_tools.store.row_hasher`).
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ckpt_tools.importer.formats import open_checkpoint
from ckpt_tools.importer.series import Series
from ckpt_tools.store import HistoryWriter, row_hasher
from ckpt_tools.tensors import TensorSpec

__all__ = ["write_series"]


def _fill(block: np.ndarray, opened, specs: Sequence[TensorSpec], lo: int, hi: int) -> None:
    """Fill `block` `(rows, hi - lo)` with elements `lo:hi` of the flat rows."""
    starts = [s.offset for s in specs]
    k = max(bisect.bisect_right(starts, lo) - 1, 0)
    while k < len(specs) and specs[k].offset < hi:
        spec = specs[k]
        a, b = max(spec.offset, lo), min(spec.stop, hi)
        if a < b:
            for r, checkpoint in enumerate(opened):
                piece = checkpoint.flat(spec.name, a - spec.offset, b - spec.offset)
                block[r, a - lo : b - lo] = piece.to(torch.float32).numpy()
        k += 1


def write_series(
    writer: HistoryWriter, series: Series, *, progress: Callable[[int], None] | None = None
) -> None:
    """Write and commit every row of `series` into `writer`'s group (created to fit it).

    Args:
        writer: A writer whose group has one row per checkpoint of `series`, in order,
            and its tensor tables.
        series: The checked series (`plan_series`).
        progress: Called with the number of rows committed so far.
    """
    rows_per_block = writer.block_shape("params")[0]
    rows = series.rows
    for start in range(0, len(rows), rows_per_block):
        batch = rows[start : start + rows_per_block]
        hashers = [row_hasher() for _ in batch]
        with contextlib.ExitStack() as stack:
            opened = [stack.enter_context(open_checkpoint(r.checkpoint)) for r in batch]
            for name, specs in (("params", series.params), ("buffers", series.buffers)):
                total = specs[-1].stop if specs else 0
                width = writer.block_shape(name)[1]
                for lo in range(0, total, width):
                    hi = min(lo + width, total)
                    block = np.empty((len(batch), hi - lo), dtype=np.float32)
                    _fill(block, opened, specs, lo, hi)
                    for r, hasher in enumerate(hashers):
                        hasher.update(block[r].astype("<f4", copy=False))
                    writer.write_block(name, start, lo, block)
        digests = np.stack([np.frombuffer(h.digest(), dtype=np.uint8) for h in hashers])
        writer.write_row_hashes(start, digests)
        writer.commit(np.arange(start, start + len(batch)))
        if progress is not None:
            progress(start + len(batch))
