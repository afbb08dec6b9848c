"""Does a stored history fit a model? One clear error naming the first mismatch.

`model.load_state_dict` into the wrong architecture fails with a multi-line list of
every missing key and shape; these checks say what differs first, in the store's terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ckpt_tools.store.layout import StoreError
from ckpt_tools.store.reader import history_meta
from ckpt_tools.tensors import TensorSpec, buffer_specs, param_specs, specs_from_json

__all__ = ["check_model", "check_state_dict", "first_mismatch"]


def first_mismatch(
    stored: Sequence[TensorSpec], actual: Sequence[TensorSpec], *, kind: str = "parameter"
) -> str | None:
    """Describe the first difference between two tensor tables (None when they agree).

    Tables agree when they list the same names with the same shapes in the same order.
    """
    for i, (a, b) in enumerate(zip(stored, actual, strict=False)):
        if a.name != b.name:
            return f"{kind} {i} is '{a.name}' in the store but '{b.name}' in the model"
        if a.shape != b.shape:
            return (f"{kind} '{a.name}' has shape {tuple(a.shape)} in the store but "
                    f"{tuple(b.shape)} in the model")
    if len(stored) != len(actual):
        longer, where = (stored, "store") if len(stored) > len(actual) else (actual, "model")
        extra = longer[min(len(stored), len(actual))]
        return f"{kind} '{extra.name}' is only in the {where}"
    return None


def check_model(model: nn.Module, path: str | Path, *, group: str = "train") -> None:
    """Check that the history `group` of the store `path` was recorded from `model`'s kind.

    Raises:
        StoreError: naming the first parameter or buffer that differs.
    """
    meta = history_meta(path, group)
    for kind, key, specs in (("parameter", "params", param_specs(model)),
                             ("buffer", "buffers", buffer_specs(model))):
        problem = first_mismatch(specs_from_json(meta[key]), specs, kind=kind)
        if problem:
            raise StoreError(f"group '{group}' in {path} was recorded from another "
                             f"architecture: {problem}")


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Check that `state` (e.g. stored weights for rewinding) fits `model` exactly.

    Raises:
        StoreError: naming the first missing, unexpected or differently shaped tensor.
    """
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise StoreError(f"the weights to load have no '{name}' that the model needs; "
                             "were they recorded from another architecture?")
        shape = tuple(getattr(state[name], "shape", ()))
        if shape != tuple(tensor.shape):
            raise StoreError(f"'{name}' has shape {shape} in the weights to load but "
                             f"{tuple(tensor.shape)} in the model")
    extra = [k for k in state if k not in expected]
    if extra:
        raise StoreError(f"the weights to load hold '{extra[0]}', which the model lacks; "
                         "were they recorded from another architecture?")
