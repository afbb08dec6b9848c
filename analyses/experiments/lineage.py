"""The pruning lineage, written once; IMP and pre-training before IMP both run it.

A lineage is a sequence of levels sharing one mask group. Level 0 is dense (its mask
keeps everything). Level n >= 1 prunes `fraction` of the weights level n-1 kept, by the
magnitude of level n-1's final weights (`pruning.prune`), stores that mask before
training, then trains the survivors. A level whose mask is stored already reuses it, so
an interrupted lineage continues where it stopped and gives the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckpt_tools.analyses.experiments.pruning import Scope, mask_from_row, mask_to_row, prune
from ckpt_tools.store import masks as mask_store
from ckpt_tools.tensors import TensorSpec

__all__ = ["Pruning", "run_lineage"]

Mask = dict[str, np.ndarray]  # bool per prunable parameter; True = kept


@dataclass(frozen=True)
class Pruning:
    """How each level prunes.

    Attributes:
        fraction: Fraction of the surviving prunable weights pruned per level.
        scope: ``"global"`` (one threshold across layers) or ``"layer"``.
        exclude: Names never pruned (e.g. the output layer's weight).
    """

    fraction: float
    scope: Scope = "global"
    exclude: tuple[str, ...] = ()


def run_lineage(
    store: str | Path,
    masks: str,
    specs: Sequence[TensorSpec],
    pruning: Pruning,
    *,
    levels: Sequence[int],
    settings: Mapping,
    final_weights: Callable[[int], Mapping[str, torch.Tensor]],
    train_level: Callable[[int, Mask | None], None],
) -> None:
    """Run the levels `levels` (increasing) of the lineage whose masks live in `masks`.

    Args:
        store: The store.
        masks: The lineage's mask group.
        specs: The parameter table of the network.
        pruning: How each level prunes.
        levels: The levels to train (level 0's mask is stored whether or not it trains).
        settings: JSON-able description stored once with the masks (a later run with
            other settings is refused by the store).
        final_weights: ``final_weights(n)``: the final weights of level n (level 0: the
            network the lineage starts from), read when level n + 1 needs pruning.
        train_level: ``train_level(n, mask)`` trains level n (mask None: dense).
    """
    prunable = [s.name for s in specs if s.prunable]
    found = mask_store.read_masks(store, masks)
    stored = set(found.levels) if found is not None else set()
    if 0 not in stored:
        mask_store.write_mask_row(store, masks, 0, mask_to_row({}, specs), params=specs,
                                  settings=settings)
    mask: Mask | None = None
    for level in range(0, max(levels, default=-1) + 1):
        if level > 0:
            if level in stored:
                full = mask_from_row(found.masks[level], found.params)
                mask = {n: full[n] for n in prunable}
            else:
                weights = final_weights(level - 1)
                mask = prune({n: weights[n] for n in prunable}, pruning.fraction, mask=mask,
                             scope=pruning.scope, exclude=list(pruning.exclude))
                mask_store.write_mask_row(store, masks, level, mask_to_row(mask, specs),
                                          params=specs, settings=settings)
        if level in levels:
            train_level(level, mask)
