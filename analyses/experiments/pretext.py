"""Pretext tasks for pre-training before IMP (the paper's Section 5), as `Task`s of the loop.

- ``rotation``: every image is turned by ``r`` quarter turns, ``r`` uniform in
  {0, 1, 2, 3} (0, 90, 180, 270 degrees counter-clockwise, ``torch.rot90(x, r,
  dims=(-2, -1))``, exact), and the label is ``r``; the model's head has 4 outputs.
- ``blur``: every image is replaced by its block average at `factor`: average pooling
  over non-overlapping ``factor x factor`` blocks tiled from the top-left corner, then
  nearest-neighbour upsampling back by repeating each block mean over its block, so the
  image keeps its size and every pixel becomes the mean of its block. When `factor` does
  not divide the image size, the blocks at the right and bottom edges are cut by the
  border and average only the pixels inside the image. Applied to normalised batches;
  the normalisation is a per-channel affine map, so this equals blurring the pixels.
- ``blur-rotation``: ``blur``, then ``rotation``.
- ``random-labels``: every training example gets one label, uniform over the classes,
  fixed for the whole run (drawn once from `seed`); test labels are left as they are.
- ``subset``: training draws only from a fixed random `fraction` of the training split
  (drawn once from `seed`; epochs run over the subset).

Rotations of training batches are drawn from ``(seed, step)``, so a run is reproducible
and every update sees its own draw; evaluation batches use ``step`` 0 (see `Task`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch.nn import functional as F

from ckpt_tools.data import ImageData
from ckpt_tools.train import Task

__all__ = [
    "PRETEXT_TASKS",
    "blur",
    "random_labels",
    "rotate",
    "subset",
    "task",
]

PRETEXT_TASKS = ("rotation", "blur", "blur-rotation", "random-labels", "subset")
ROTATIONS = 4  # classes of the rotation task: 0, 90, 180, 270 degrees


def rotate(
    x: torch.Tensor, *, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn each image by a random number of quarter turns; the label is that number.

    Args:
        x: Images (B, C, H, W) with H = W.
        seed: Seed of the run's rotations.
        step: Update number; each step draws its own rotations.

    Returns:
        The rotated images (B, C, H, W) and the int64 labels ``r`` (B,) in {0, 1, 2, 3},
        with image ``i`` equal to ``torch.rot90(x[i], r[i], dims=(-2, -1))``.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    rng = np.random.default_rng([seed, step, 90])
    r = torch.from_numpy(rng.integers(0, ROTATIONS, size=len(x))).to(x.device)
    out = x.clone()
    for turns in range(1, ROTATIONS):
        hit = r == turns
        out[hit] = torch.rot90(x[hit], turns, dims=(-2, -1))
    return out, r


def blur(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Replace every pixel by the mean of its ``factor x factor`` block (see module docstring).

    Args:
        x: Images (B, C, H, W), float.
        factor: Block size in pixels (1: unchanged).

    Returns:
        Blurred images, same shape.
    """
    if factor < 1:
        raise ValueError(f"blur factor must be >= 1, got {factor}")
    h, w = x.shape[-2:]
    # ceil_mode keeps the cut edge blocks; with no padding they average only inside pixels.
    small = F.avg_pool2d(x, factor, stride=factor, ceil_mode=True)
    return small.repeat_interleave(factor, -2).repeat_interleave(factor, -1)[..., :h, :w]


def random_labels(data: ImageData, *, seed: int) -> ImageData:
    """The dataset with each training label replaced by a fixed uniform random class."""
    rng = np.random.default_rng([seed, 1717])
    labels = rng.integers(0, data.num_classes, size=len(data.y_train))
    return dataclasses.replace(data, y_train=torch.from_numpy(labels).to(torch.int64))


def subset(data: ImageData, *, fraction: float, seed: int) -> ImageData:
    """The dataset with its training split cut to a fixed random `fraction` (at least 1)."""
    _check_fraction(fraction)
    n = len(data.y_train)
    keep = np.random.default_rng([seed, 2323]).permutation(n)[: max(1, math.ceil(fraction * n))]
    keep = np.sort(keep)
    index = torch.from_numpy(keep)
    return dataclasses.replace(data, x_train=data.x_train[index], y_train=data.y_train[index])


def task(
    name: str, *, seed: int, blur_factor: int = 4, subset_fraction: float = 0.1
) -> Task:
    """The training-loop `Task` of a pretext task.

    Args:
        name: One of `PRETEXT_TASKS`.
        seed: Seed of the rotations, random labels or subset.
        blur_factor: Block size of ``blur`` and ``blur-rotation``.
        subset_fraction: Fraction of the training split kept by ``subset``.

    Raises:
        ValueError: unknown name or bad parameter.
    """
    if blur_factor < 1:
        raise ValueError(f"blur factor must be >= 1, got {blur_factor}")
    if name == "rotation":
        return Task(prepare=_four_way, transform=lambda x, y, s: rotate(x, seed=seed, step=s))
    if name == "blur":
        return Task(transform=lambda x, y, s: (blur(x, blur_factor), y))
    if name == "blur-rotation":
        return Task(
            prepare=_four_way,
            transform=lambda x, y, s: rotate(blur(x, blur_factor), seed=seed, step=s),
        )
    if name == "random-labels":
        return Task(prepare=lambda d: random_labels(d, seed=seed))
    if name == "subset":
        _check_fraction(subset_fraction)
        return Task(prepare=lambda d: subset(d, fraction=subset_fraction, seed=seed))
    raise ValueError(f"unknown pretext task {name!r}; known: {', '.join(PRETEXT_TASKS)}")


def _four_way(data: ImageData) -> ImageData:
    return dataclasses.replace(data, num_classes=ROTATIONS)


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
