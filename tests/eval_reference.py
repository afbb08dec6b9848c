"""An independent evaluation of stored weights, for tests to compare the library's against.

It shares only the model's construction with the library: the weights are cut by hand out
of the raw Zarr rows, the test split is normalised here, and loss and accuracy are
`torch.nn.functional.cross_entropy` and ``argmax`` over the whole split in one pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import zarr

from ckpt_tools.train import TrainConfig, build


def stored_state(store: Path, step: int, group: str = "train") -> dict[str, torch.Tensor]:
    """The parameters and buffers of the committed row of `step`, straight from Zarr."""
    g = zarr.open_group(str(Path(store) / group), mode="r")
    (row,) = np.flatnonzero((g["step"][:] == step) & np.asarray(g["committed"][:], bool))
    meta = g.attrs["ckpt_tools"]
    state = {}
    for key in ("params", "buffers"):
        values = np.asarray(g[key][int(row)])
        for spec in meta[key]:
            piece = values[spec["offset"] : spec["offset"] + math.prod(spec["shape"])]
            state[spec["name"]] = torch.from_numpy(
                piece.reshape(spec["shape"]).astype(spec["dtype"]))
    return state


def split_logits(store: Path, step: int, group: str = "train",
                state: dict[str, torch.Tensor] | None = None):
    """Logits (N, classes) of the whole test split and its labels (N,), in eval mode.

    The model is the run's (its stored configuration); `state` replaces the stored weights.
    """
    config = TrainConfig.from_dict(
        zarr.open_group(str(Path(store) / group), mode="r").attrs["ckpt_tools"]["config"])
    model, data = build(config)
    model.load_state_dict(stored_state(store, step, group) if state is None else state)
    model.eval()
    mean = torch.tensor(data.mean).view(-1, 1, 1)
    std = torch.tensor(data.std).view(-1, 1, 1)
    with torch.no_grad():
        logits = model((data.x_test.float() / 255 - mean) / std)
    return logits, data.y_test


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy (nats) and the fraction of argmax predictions that are right."""
    loss = torch.nn.functional.cross_entropy(logits.double(), labels)
    return float(loss), float((logits.argmax(1) == labels).double().mean())


def reference_eval(store: Path, step: int, group: str = "train") -> tuple[float, float]:
    """Test loss and accuracy of the stored weights of `step`, the slow, obvious way."""
    return loss_and_accuracy(*split_logits(store, step, group))
