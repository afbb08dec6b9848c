"""The tensor table: how a model's state maps onto the flat `(step, param)` layout.

Every parameter is flattened (C order) and laid end to end in `model.named_parameters()`
order; buffers (BatchNorm running statistics and counters) likewise in `state_dict` order.
A `TensorSpec` records where each tensor lives, so a row of the store turns back into a
`state_dict` and a `(step, param)` slice turns back into a layer's weights in its shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "TensorSpec",
    "buffer_specs",
    "param_specs",
    "specs_from_json",
    "specs_to_json",
    "split_row",
    "unwrap",
]

_PRUNABLE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor of a model's state lives in a flat row.

    Attributes:
        name: The `state_dict` key, e.g. ``"layer1.0.conv1.weight"``.
        shape: The tensor's shape.
        offset: Index of its first element in the flat row.
        dtype: Its torch dtype as text (``"float32"``, ``"int64"``); rows are float32.
        prunable: True for conv and linear weights (the tensors IMP prunes).
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    dtype: str
    prunable: bool

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        """One past the index of its last element in the flat row."""
        return self.offset + self.size


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a `DistributedDataParallel`/`DataParallel` wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _prunable_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _PRUNABLE_MODULES) and module.weight is not None:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def _table(named: Iterable[tuple[str, torch.Tensor]], prunable: set[str]) -> list[TensorSpec]:
    specs, offset = [], 0
    for name, tensor in named:
        dtype = str(tensor.dtype).removeprefix("torch.")
        spec = TensorSpec(name, tuple(tensor.shape), offset, dtype, name in prunable)
        specs.append(spec)
        offset = spec.stop
    return specs


def param_specs(model: nn.Module) -> list[TensorSpec]:
    """Table of every parameter of `model`, in `named_parameters()` order."""
    model = unwrap(model)
    return _table(model.named_parameters(), _prunable_names(model))


def buffer_specs(model: nn.Module) -> list[TensorSpec]:
    """Table of the buffers that `state_dict` holds (persistent buffers), in its order."""
    model = unwrap(model)
    params = {name for name, _ in model.named_parameters()}
    state = model.state_dict(keep_vars=True)
    return _table(((k, v) for k, v in state.items() if k not in params), set())


def split_row(row: np.ndarray, specs: Iterable[TensorSpec]) -> dict[str, torch.Tensor]:
    """Turn one flat float32 row back into named tensors of their shapes and dtypes."""
    out = {}
    for spec in specs:
        flat = torch.from_numpy(np.ascontiguousarray(row[spec.offset : spec.stop]))
        out[spec.name] = flat.reshape(spec.shape).to(getattr(torch, spec.dtype))
    return out


def specs_to_json(specs: Iterable[TensorSpec]) -> list[dict]:
    """JSON-ready form of a table (stored in the group attributes)."""
    return [{**asdict(s), "shape": list(s.shape)} for s in specs]


def specs_from_json(items: Iterable[Mapping]) -> list[TensorSpec]:
    """Inverse of `specs_to_json`."""
    return [
        TensorSpec(
            str(i["name"]), tuple(int(d) for d in i["shape"]), int(i["offset"]),
            str(i["dtype"]), bool(i["prunable"]),
        )
        for i in items
    ]
