"""A stored step as a checkpoint file: ``ckpt export``.

The file holds the step's `state_dict` under the stored tensor names, each tensor in its
original dtype (half precision included), so ``model.load_state_dict`` takes it, and a
safetensors file of a Hugging Face model (saved as ``model.safetensors`` beside its
``config.json``) loads with ``from_pretrained``.
"""

from __future__ import annotations

import os
import uuid
from enum import StrEnum
from pathlib import Path

import torch

from ckpt_tools.api import load_state_dict

__all__ = ["ExportFormat", "export_step"]


class ExportFormat(StrEnum):
    """File formats `export_step` writes."""

    safetensors = "safetensors"
    torch = "torch"


def export_step(
    path: str | Path,
    step: int,
    out: str | Path,
    *,
    group: str = "train",
    fmt: ExportFormat | str = ExportFormat.safetensors,
    overwrite: bool = False,
) -> Path:
    """Write the weights stored at `step` of `group` to the file `out`.

    The file appears whole or not at all (written under a temporary name, then renamed).

    Returns:
        `out`.

    Raises:
        StoreError: `step` is not stored (the message lists the nearest stored steps).
        ValueError: `out` exists and `overwrite` is false, or its folder is missing.
    """
    fmt, out = ExportFormat(fmt), Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"directory {out.parent} does not exist; create it first")
    state = load_state_dict(path, step, group=group)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.partial")
    try:
        if fmt is ExportFormat.safetensors:
            try:
                from safetensors.torch import save_file
            except ImportError:
                raise ValueError("safetensors export needs the safetensors package: pip "
                                 "install 'ckpt-tools[hub]'") from None
            # "format": "pt" is what Transformers' from_pretrained expects of the metadata.
            save_file(state, str(tmp), metadata={"format": "pt", "step": str(step)})
        else:
            torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
