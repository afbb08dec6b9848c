"""Post-hoc evaluation: test loss and accuracy of the stored weights at any steps.

Training need not stop to evaluate densely: the model is rebuilt from the run's stored
configuration and the stored parameters and buffers (BatchNorm statistics) of each step
are loaded into it. One task per step, in parallel on the current dask scheduler
(threads, or the workers of a ``dask.distributed`` cluster), each with one torch thread;
the steps of a storage chunk share one read of it, and each worker process loads the
dataset once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import dask
import numpy as np
import torch
import xarray as xr
from dask import delayed

from ckpt_tools import data as datasets
from ckpt_tools import models
from ckpt_tools.analyses._history import History, NotApplicable, as_history
from ckpt_tools.store import ATTRS_KEY
from ckpt_tools.tensors import specs_from_json, split_row
from ckpt_tools.train import TrainConfig
from ckpt_tools.train import evaluate as evaluate_model

__all__ = ["chart", "compute"]


def compute(
    history: History,
    *,
    steps: Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
) -> xr.Dataset:
    """Test loss and accuracy of the stored weights.

    Args:
        history: A store path (its ``train`` history), a `DataTree` node or a history
            Dataset.
        steps: The recorded steps to evaluate (default: all of them).
        batch_size: Test examples per forward pass (default: the run's
            ``eval_batch_size``).
        device: Where to evaluate (``"cpu"``, ``"cuda"``, ...).

    Returns:
        A Dataset on ``step`` with ``test_loss`` (mean cross-entropy, nats) and
        ``test_accuracy`` (fraction correct) over the whole test split, float64.

    Raises:
        NotApplicable: the history was not recorded by the built-in training loop (no
            model/dataset configuration), or its weights do not fit the rebuilt model.
        ValueError: a requested step is not stored, or no step is requested.
    """
    ds = as_history(history)
    meta = ds.attrs[ATTRS_KEY]
    config = _config(meta)
    index = _positions(np.asarray(ds["step"].values), steps)
    batch = int(batch_size or config.eval_batch_size)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch}")
    params = ds["params"].isel(step=index).data
    buffers = ds["buffers"].isel(step=index).data.rechunk({0: params.chunks[0]})
    p_blocks, b_blocks = params.to_delayed(), buffers.to_delayed()
    tasks = [
        delayed(_evaluate_row)(list(p_blocks[i]), list(b_blocks[i]), r, config.to_dict(),
                               meta["params"], meta["buffers"], batch, device)
        for i, rows in enumerate(params.chunks[0]) for r in range(rows)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # dask runs the tasks in parallel; one torch thread each
    try:
        (results,) = dask.compute(tasks)
    finally:
        torch.set_num_threads(threads)
    loss = np.array([r[0] for r in results])
    accuracy = np.array([r[1] for r in results])
    out = xr.Dataset(
        {
            "test_loss": ("step", loss, {"long_name": "test loss (mean cross-entropy)",
                                         "units": "nats"}),
            "test_accuracy": ("step", accuracy, {"long_name": "test accuracy",
                                                 "units": "1"}),
        },
        coords={"step": np.asarray(ds["step"].values)[index]},
    )
    out.attrs[ATTRS_KEY] = {
        "analysis": "evaluate",
        "options": {"batch_size": batch, "device": device},
        "dataset": config.dataset,
        "split": "test",
    }
    return out


def _config(meta: dict) -> TrainConfig:
    values = meta.get("config") or {}
    if not isinstance(values, dict) or not {"model", "dataset"} <= values.keys():
        raise NotApplicable("the history has no built-in model/dataset configuration (it "
                            "was recorded from a custom loop), so it cannot be rebuilt")
    return TrainConfig.from_dict(values)


def _positions(stored: np.ndarray, steps: Sequence[int] | None) -> np.ndarray:
    if steps is None:
        index = np.arange(stored.size)
    else:
        wanted = np.asarray(list(steps), dtype=np.int64)
        missing = np.setdiff1d(wanted, stored)
        if missing.size:
            shown = ", ".join(str(s) for s in missing[:5])
            raise ValueError(f"steps not stored in this history: {shown}"
                             f"{' ...' if missing.size > 5 else ''}")
        index = np.flatnonzero(np.isin(stored, wanted))
    if index.size == 0:
        raise ValueError("no steps to evaluate")
    return index


@functools.lru_cache(maxsize=2)
def _dataset(name: str, root: str | None, resolution: int | None = None) -> datasets.ImageData:
    return datasets.load(name, root=root, resolution=resolution)


def _evaluate_row(p_parts, b_parts, row, config, p_table, b_table, batch_size, device):
    """Evaluate row `row` of one stored chunk; returns (loss, accuracy)."""
    config = TrainConfig.from_dict(config)
    params = np.concatenate([p[row] for p in p_parts])
    buffers = np.concatenate([b[row] for b in b_parts]) if b_parts else np.zeros(0)
    data = _dataset(config.dataset, config.data_root, config.resolution)
    model = models.build(
        config.model, num_classes=data.num_classes, in_channels=data.in_channels,
        image_size=data.image_size, width=config.width,
    ).to(device)
    state = {**split_row(params, specs_from_json(p_table)),
             **split_row(buffers, specs_from_json(b_table))}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise NotApplicable("the stored weights do not fit the model rebuilt from the "
                            f"stored configuration ({str(exc).splitlines()[0]})") from None
    metrics = evaluate_model(model, data, batch_size=batch_size, device=device)
    return metrics["test_loss"], metrics["test_accuracy"]


def chart(result: xr.Dataset):
    """Post-hoc test accuracy and loss against the step, side by side."""
    import altair as alt

    frame = result[["test_accuracy", "test_loss"]].to_dataframe().reset_index()
    base = alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step (optimizer updates)"))
    return alt.hconcat(
        base.encode(y=alt.Y("test_accuracy:Q", title="test accuracy")).properties(
            title="Post-hoc test accuracy"),
        base.encode(y=alt.Y("test_loss:Q", title="test loss (nats)")).properties(
            title="Post-hoc test loss"),
    )
