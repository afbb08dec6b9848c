"""``ds.ckpt``: a recorded history's analyses and tensors, from a notebook.

Registered on every `xarray.Dataset` when ``ckpt_tools.analyses`` is imported::

    import ckpt_tools, ckpt_tools.analyses
    ds = ckpt_tools.open_history("run.zarr")
    ds.ckpt.telemetry()                   # the telemetry Dataset
    ds.ckpt.layer("layer1.0.conv1.weight")  # (step, out, in, k0, k1), lazy
    ds.ckpt.state_dict(100)               # for model.load_state_dict
    ds.ckpt.optimizer_state(100)          # {tensor: {"exp_avg": ...}} (optimizer_state=True)
    ds.ckpt.batch(100)                    # example ids of update 100's batch (batch=...)
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ckpt_tools.analyses._history import as_history, buffer_table, param_table
from ckpt_tools.optim_state import ARRAY_PREFIX
from ckpt_tools.schedule import nearest
from ckpt_tools.store import StoreError
from ckpt_tools.tensors import TensorSpec, split_row

__all__ = ["CkptAccessor", "tensor_dims"]


def tensor_dims(shape: tuple[int, ...]) -> tuple[str, ...]:
    """Dimension names of a tensor of `shape`: ``out``, ``in``, then ``k0``, ``k1``, ...

    (a conv weight is ``(out, in, k0, k1)``, a linear weight ``(out, in)``, a bias or a
    BatchNorm vector ``(out,)``).
    """
    names = ("out", "in", *(f"k{i}" for i in range(max(len(shape) - 2, 0))))
    return names[: len(shape)]


@xr.register_dataset_accessor("ckpt")
class CkptAccessor:
    """The ``ckpt`` namespace of a history Dataset (see the module docstring)."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def telemetry(self, **options) -> xr.Dataset:
        """`ckpt_tools.analyses.telemetry.compute` of this history."""
        from ckpt_tools.analyses import telemetry

        return telemetry.compute(self._ds, **options)

    def evaluate(self, **options) -> xr.Dataset:
        """`ckpt_tools.analyses.evaluate.compute` of this history."""
        from ckpt_tools.analyses import evaluate

        return evaluate.compute(self._ds, **options)

    def tensors(self) -> list[str]:
        """Names of every parameter, then every buffer, of the recorded model."""
        ds = as_history(self._ds)
        return [s.name for s in (*param_table(ds), *buffer_table(ds))]

    def _find(self, name: str) -> tuple[TensorSpec, str, str]:
        ds = as_history(self._ds)
        for var, dim, specs in (("params", "param", param_table(ds)),
                                ("buffers", "buffer", buffer_table(ds))):
            for spec in specs:
                if spec.name == name:
                    return spec, var, dim
        raise KeyError(f"no tensor {name!r} in this history; see ds.ckpt.tensors()")

    def layer(self, name: str, *, state: str | None = None) -> xr.DataArray:
        """One parameter or buffer in its tensor shape at every step, lazily.

        Args:
            name: The tensor (see `tensors`).
            state: An optimizer state entry (see `optimizer_states`) to give instead of
                the parameter itself, e.g. ``"exp_avg"``.

        Returns:
            float32 DataArray on ``(step, *tensor_dims(shape))`` (a reshape of the
            tensor's slice of ``params``/``buffers``/``optim_<state>``; nothing is read
            until used).

        Raises:
            KeyError: no tensor of that name, or no such optimizer state for it.
        """
        spec, var, dim = self._find(name)
        if state is not None:
            if var != "params" or state not in self.optimizer_states():
                raise KeyError(f"no optimizer state {state!r} for {name!r}; recorded: "
                               f"{', '.join(self.optimizer_states()) or 'none'}")
            var = ARRAY_PREFIX + state
        flat = self._ds[var].isel({dim: slice(spec.offset, spec.stop)}).transpose(..., dim)
        lead = [d for d in flat.dims if d != dim]
        data = flat.data.reshape(*(flat.sizes[d] for d in lead), *spec.shape)
        coords = {d: flat.coords[d] for d in lead if d in flat.coords}
        return xr.DataArray(
            data, dims=(*lead, *tensor_dims(spec.shape)), coords=coords, name=name,
            attrs={"tensor": name, "shape": list(spec.shape), "prunable": int(spec.prunable),
                   **({"optimizer_state": state} if state else {})},
        )

    def optimizer_states(self) -> list[str]:
        """Names of the recorded optimizer state entries, e.g. ``["exp_avg", "exp_avg_sq"]``.

        Empty unless the history was recorded with ``optimizer_state=True``.
        """
        return [str(v).removeprefix(ARRAY_PREFIX) for v in self._ds.data_vars
                if str(v).startswith(ARRAY_PREFIX) and self._ds[v].dims[-1:] == ("param",)]

    def optimizer_state(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer state stored at `step`, per parameter: ``{name: {entry: tensor}}``.

        Entries are float32 in the parameter's shape; NaN where the optimizer had none.

        Raises:
            StoreError: `step` is not a step of this Dataset.
        """
        row = self._row(step)
        specs = param_table(as_history(self._ds))
        out: dict[str, dict[str, torch.Tensor]] = {s.name: {} for s in specs}
        for entry in self.optimizer_states():
            flat = np.asarray(row[ARRAY_PREFIX + entry].values, dtype=np.float32)
            for spec in specs:
                out[spec.name][entry] = torch.from_numpy(
                    flat[spec.offset:spec.stop].copy()).reshape(spec.shape)
        return out

    def batch(self, step: int) -> np.ndarray:
        """The example ids of the batch of update `step` (int64; recorded with ``batch=``).

        Raises:
            KeyError: the history holds no batch ids.
            StoreError: `step` is not a step of this Dataset.
        """
        if "batch" not in self._ds:
            raise KeyError("this history holds no batch ids (record(step, batch=ids))")
        ids = np.asarray(self._row(step)["batch"].values, dtype=np.int64)
        return ids[ids >= 0]

    def _row(self, step: int) -> xr.Dataset:
        ds = as_history(self._ds)
        stored = np.asarray(ds["step"].values)
        hits = np.flatnonzero(stored == step)
        if not hits.size:
            raise StoreError(f"step {step} is not in this history; nearest: "
                             f"{', '.join(map(str, nearest(stored, step))) or 'none'}")
        return ds.isel(step=int(hits[0]))

    def state_dict(self, step: int) -> dict[str, torch.Tensor]:
        """The parameters and buffers stored at `step`, as `model.load_state_dict` takes.

        Raises:
            StoreError: `step` is not a step of this Dataset (the message lists the
                nearest ones).
        """
        ds = as_history(self._ds)
        row = self._row(step)
        return {**split_row(np.asarray(row["params"].values), param_table(ds)),
                **split_row(np.asarray(row["buffers"].values), buffer_table(ds))}
