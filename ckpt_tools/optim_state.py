"""The optimizer's per-parameter state as rows of the flat `(step, param)` layout.

`Recorder(..., optimizer=opt, optimizer_state=True)` stores every state entry that holds
one value per weight as its own `(step, param)` array, named ``optim_<entry>``, laid out
exactly like `params`: SGD's ``momentum_buffer``; Adam's and AdamW's ``exp_avg`` and
``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``); RMSprop's ``square_avg`` (with
``momentum_buffer`` and ``grad_avg`` when it uses them); Adagrad's ``sum``, and so on.
A parameter with no state yet (step 0, before the first update) or none at all (not in
the optimizer, frozen) reads as NaN.

The entries must be known when the store's arrays are created, before the first update
has made any state: they come from the optimizer's class and settings below, or, for
other optimizers, from state it already holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ARRAY_PREFIX", "state_names", "state_tensors"]

ARRAY_PREFIX = "optim_"
"""Store arrays of optimizer state are named ``optim_<entry>``."""


def _any(optimizer: torch.optim.Optimizer, key: str) -> bool:
    return any(group.get(key) for group in optimizer.param_groups)


def _known(optimizer: torch.optim.Optimizer) -> list[str] | None:
    o = torch.optim
    if isinstance(optimizer, o.SGD):
        return ["momentum_buffer"] if _any(optimizer, "momentum") else []
    if isinstance(optimizer, o.Adam | o.AdamW):
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if _any(optimizer, "amsgrad")
                                            else [])
    if isinstance(optimizer, o.NAdam | o.RAdam):
        return ["exp_avg", "exp_avg_sq"]
    if isinstance(optimizer, o.Adamax):
        return ["exp_avg", "exp_inf"]
    if isinstance(optimizer, o.RMSprop):
        return (["square_avg"] + (["momentum_buffer"] if _any(optimizer, "momentum") else [])
                + (["grad_avg"] if _any(optimizer, "centered") else []))
    if isinstance(optimizer, o.Adagrad):
        return ["sum"]
    if isinstance(optimizer, o.Adadelta):
        return ["square_avg", "acc_delta"]
    return None


def state_names(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The per-parameter state entries `optimizer` keeps (one value per weight each).

    Raises:
        ValueError: an optimizer of another kind that holds no state yet (its entries
            cannot be known), or one that keeps no per-weight state at all.
    """
    names = _known(optimizer)
    if names is None:
        names = sorted({key for p, state in optimizer.state.items() for key, value in
                        state.items() if isinstance(value, torch.Tensor)
                        and value.shape == p.shape and p.numel() > 1})
        if not optimizer.state:
            raise ValueError(
                f"optimizer_state=True cannot tell which state {type(optimizer).__name__} "
                "keeps before its first step; create the Recorder after one update"
            )
    if not names:
        raise ValueError(f"{type(optimizer).__name__} with these settings keeps no "
                         "per-weight state; record without optimizer_state")
    return tuple(names)


def state_tensors(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], name: str
) -> list[torch.Tensor | None]:
    """State entry `name` of each of `params`, in order (None where there is none yet)."""
    out = []
    for p in params:
        value = optimizer.state.get(p, {}).get(name)
        out.append(value if isinstance(value, torch.Tensor) and value.shape == p.shape
                   else None)
    return out
