"""The registry of experiments: name -> module defining ``EXPERIMENT``.

Adding an experiment is one module (see `ckpt_tools.analyses.experiments.contract`) and
one line here; ``ckpt <name>`` is generated from it. Modules are imported when used.
"""

from __future__ import annotations

import importlib

from ckpt_tools.analyses.experiments.contract import Experiment

__all__ = ["EXPERIMENTS", "get", "names"]

EXPERIMENTS: dict[str, str] = {
    "imp": "ckpt_tools.analyses.experiments.imp",
    "instability": "ckpt_tools.analyses.experiments.instability",
    "ablate": "ckpt_tools.analyses.experiments.ablate",
    "pretrain": "ckpt_tools.analyses.experiments.pretrain",
}
"""Registered experiments whose command is generated from the contract, by name."""


def names() -> list[str]:
    """The registered experiment names, in order."""
    return list(EXPERIMENTS)


def get(name: str) -> Experiment:
    """The experiment `name`.

    Raises:
        KeyError: no experiment of that name (the message lists the registered ones).
    """
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; registered: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name]).EXPERIMENT
