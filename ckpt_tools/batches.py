"""Deterministic, resumable mini-batches: a pure function of ``(seed, step)``.

Resuming or rewinding to any step needs no loader state.

For optimizer update ``step`` (1-based) with ``B = batches_per_epoch(data, batch_size)``:

- epoch ``e = (step - 1) // B``; its order is ``torch.randperm`` drawn from a CPU
  ``torch.Generator`` seeded from ``(seed, e)``; the last incomplete batch is dropped;
- the batch is positions ``[p * batch_size, (p + 1) * batch_size)`` of that order, with
  ``p = (step - 1) % B``;
- when ``data.augment``, each image gets a random crop (zero padding ``pad_for(size)``
  pixels on every side, then a window of the original size: 4 at 32x32, 2 at 28x28, 1 at
  14x14 and 8x8) and a horizontal flip with probability 1/2, drawn from a generator
  seeded from ``(seed, step)`` (`augmentation`).

Generator seeds are 63-bit BLAKE2b hashes of ``(stream, seed, index)``, so the order and
augmentation streams never collide. All randomness is drawn on the CPU; only the selected
uint8 images move to ``device``, so the batches do not depend on the device.
"""

import functools
import hashlib
from collections.abc import Iterator

import torch

from ckpt_tools.data import ImageData

__all__ = [
    "augmentation", "batch_for_step", "batch_indices", "batches_per_epoch", "crop_and_flip",
    "normalize", "pad_for", "test_batches",
]


def pad_for(image_size: int) -> int:
    """Pixels of zero padding before the random crop of an ``image_size`` image.

    4 at 32x32 and above (CIFAR's recipe), else ``max(1, image_size // 14)``: 2 at 28x28,
    1 at 14x14 and 8x8.
    """
    return 4 if image_size >= 32 else max(1, image_size // 14)


def batches_per_epoch(data: ImageData, batch_size: int) -> int:
    """Full training batches per epoch (the last incomplete batch is dropped).

    Raises:
        ValueError: ``batch_size`` < 1 or larger than the training split.
    """
    return _full_batches(len(data.y_train), batch_size, data.name)


def batch_for_step(
    data: ImageData,
    step: int,
    *,
    batch_size: int,
    seed: int,
    train: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mini-batch used by optimizer update ``step``.

    Args:
        data: the dataset.
        step: 1-based update number.
        batch_size: images per batch.
        seed: data-order seed of the run.
        train: draw from the training split (augmented when ``data.augment``); False
            draws from the test split the same way, never augmented.
        device: where the returned tensors go (None: stay on the CPU).

    Returns:
        ``x`` float32 (batch_size, C, H, W) normalised with ``data.mean``/``data.std``,
        and ``y`` int64 (batch_size,).
    """
    if step < 1:
        raise ValueError(f"step is 1-based (the batch of the first update is step 1), got {step}")
    x_all, y_all = (data.x_train, data.y_train) if train else (data.x_test, data.y_test)
    index = batch_indices(data, step, batch_size=batch_size, seed=seed, train=train)
    x, y = x_all[index], y_all[index]
    if train and data.augment:
        x = crop_and_flip(x, *augmentation(data, step, batch_size=batch_size, seed=seed))
    return normalize(data, x, device=device), _to(y, device)


def augmentation(
    data: ImageData, step: int, *, batch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random crop and flip of each image in the training batch of update ``step``.

    Returns:
        ``dy``, ``dx``: int64 (batch_size,), the crop window's top-left corner in the
        padded image, each in ``[0, 2 * pad_for(data.image_size)]``; ``flip``: bool
        (batch_size,), whether the crop is mirrored left-right.
    """
    pad = pad_for(data.image_size)
    generator = torch.Generator().manual_seed(_stream_seed("augment", seed, step))
    dy = torch.randint(0, 2 * pad + 1, (batch_size,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch_size,), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < 0.5
    return dy, dx, flip


def batch_indices(
    data: ImageData, step: int, *, batch_size: int, seed: int, train: bool = True
) -> torch.Tensor:
    """Which examples make up the mini-batch of optimizer update ``step``.

    Args:
        data: the dataset.
        step: 1-based update number.
        batch_size: images per batch.
        seed: data-order seed of the run.
        train: indices into the training split (False: the test split).

    Returns:
        int64 (batch_size,): positions in ``data.x_train`` (or ``x_test``), in batch order.
    """
    if step < 1:
        raise ValueError(f"step is 1-based (the batch of the first update is step 1), got {step}")
    n = len(data.y_train if train else data.y_test)
    epoch, position = divmod(step - 1, _full_batches(n, batch_size, data.name))
    order = _epoch_order(seed, "train" if train else "test", epoch, n)
    return order[position * batch_size : (position + 1) * batch_size]


def test_batches(
    data: ImageData, batch_size: int, device: torch.device | str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over the whole test split in order, normalised, the last batch possibly short.

    Yields:
        ``x`` float32 (<= batch_size, C, H, W) and ``y`` int64 (<= batch_size,).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(data.y_test), batch_size):
        x, y = data.x_test[start : start + batch_size], data.y_test[start : start + batch_size]
        yield normalize(data, x, device=device), _to(y, device)


test_batches.__test__ = False  # a library function, not a pytest test, wherever it is imported


def normalize(
    data: ImageData, x: torch.Tensor, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Turn uint8 images (B, C, H, W) into float32 ``(x / 255 - mean) / std`` on ``device``."""
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize takes uint8 images, got {x.dtype}")
    x = _to(x, device).float().div_(255)
    mean = torch.tensor(data.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(data.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def _to(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return t if device is None else t.to(device, non_blocking=True)


def _full_batches(n: int, batch_size: int, name: str) -> int:
    if not 1 <= batch_size <= n:
        raise ValueError(f"{name}: batch_size must be in [1, {n}], got {batch_size}")
    return n // batch_size


def _stream_seed(stream: str, seed: int, index: int) -> int:
    key = f"ckpt-tools/{stream}/{seed}/{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, split: str, epoch: int, n: int) -> torch.Tensor:
    # Cached: consecutive steps share an epoch; callers only index the result.
    generator = torch.Generator().manual_seed(_stream_seed(f"order-{split}", seed, epoch))
    return torch.randperm(n, generator=generator)


def crop_and_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Random crops and flips of uint8 images (B, C, H, W), as `augmentation` draws them.

    Each image is padded with ``pad_for(H)`` zeros on every side, cropped to (H, W) at
    ``(dy, dx)`` and mirrored left-right where ``flip``.
    """
    # One gather does crop and flip: a flipped crop reads its window's columns in reverse.
    b, c, h, w = x.shape
    pad = pad_for(h)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
