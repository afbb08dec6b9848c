"""Synthetic histories of any size, written with the store writer: for benchmarks and tests.

The weights follow a seeded random walk from a Kaiming-like initialisation, so they
compress and change sign like recorded weights, without training anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ckpt_tools.store import CHUNK_STEPS, HistoryWriter
from ckpt_tools.tensors import TensorSpec

__all__ = ["synthetic_specs", "write_synthetic_history"]

_FAN_IN = 64  # columns of every synthetic weight matrix


def synthetic_specs(n_params: int, *, layer_size: int = 1 << 16) -> list[TensorSpec]:
    """A parameter table of about `n_params` weights.

    Layers are alternately a prunable ``(rows, 64)`` weight of about `layer_size`
    elements and its ``(64,)`` bias, until at least `n_params` weights are laid out.
    """
    rows = max(layer_size // _FAN_IN, 1)
    specs, offset, i = [], 0, 0
    while offset < n_params:
        weight = TensorSpec(f"layer{i}.weight", (rows, _FAN_IN), offset, "float32", True)
        bias = TensorSpec(f"layer{i}.bias", (_FAN_IN,), weight.stop, "float32", False)
        specs += [weight, bias]
        offset, i = bias.stop, i + 1
    return specs


def write_synthetic_history(
    path: str | Path,
    *,
    n_steps: int,
    n_params: int = 0,
    specs: Sequence[TensorSpec] | None = None,
    group: str = "train",
    seed: int = 0,
    step_size: float = 1e-3,
    overwrite: bool = False,
    codec: str = "lz4",
) -> Path:
    """Write a history of `n_steps` steps (0, 1, ..., n_steps - 1) of about `n_params` weights.

    The parameter table is `specs` (e.g. ``param_specs(model)`` of a real model) or else
    `synthetic_specs(n_params)`. Each step adds Gaussian noise of standard deviation
    `step_size` to every weight; per-layer gradient norms are positive random numbers.
    Memory use is one chunk of `CHUNK_STEPS` rows, whatever the size. `codec` is the
    store's codec for the weights (``"lz4"`` or ``"none"``).

    Returns:
        `path`.
    """
    specs = list(specs) if specs is not None else synthetic_specs(n_params)
    rng = np.random.default_rng(seed)
    width = specs[-1].stop
    writer = HistoryWriter.create(
        path, group, steps=list(range(n_steps)), params=specs, buffers=[],
        attrs={"config": {}, "synthetic": {"seed": seed, "step_size": step_size}},
        root_attrs={"synthetic": True}, overwrite=overwrite, codec=codec,
    )
    try:
        current = rng.standard_normal(width, dtype=np.float32) * np.float32(0.2)
        rows = np.empty((CHUNK_STEPS, width), np.float32)
        for start in range(0, n_steps, CHUNK_STEPS):
            k = min(CHUNK_STEPS, n_steps - start)
            for r in range(k):
                if start + r:
                    noise = rng.standard_normal(width, dtype=np.float32)
                    current += np.float32(step_size) * noise
                rows[r] = current
            grads = rng.random((k, len(specs)), dtype=np.float32) + np.float32(0.1)
            writer.write_rows(start, rows[:k], np.empty((k, 0), np.float32), grads,
                              {"loss": np.linspace(2.0, 1.0, k)})
            writer.commit(np.arange(start, start + k))
    finally:
        writer.close()
    return Path(path)
