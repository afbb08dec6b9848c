"""Augmentation (random crop + flip) and lower input resolution, against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools.batches import augmentation, batch_for_step, batch_indices, crop_and_flip, pad_for
from ckpt_tools.cli.app import app
from ckpt_tools.config import TrainConfig
from ckpt_tools.data import ImageData, load
from ckpt_tools.train import build

pytestmark = pytest.mark.usefixtures("one_thread")


def random_images(n: int, channels: int, size: int, augment: bool = True) -> ImageData:
    x = torch.from_numpy(np.random.default_rng(size).integers(0, 256, (n, channels, size, size),
                                                              dtype=np.uint8))
    return ImageData(name=f"random{size}", x_train=x, y_train=torch.arange(n) % 10,
                     x_test=x[:8], y_test=torch.arange(8) % 10, num_classes=10,
                     in_channels=channels, image_size=size, mean=(0.5,) * channels,
                     std=(0.25,) * channels, augment=augment)


def reference_crop_flip(image: np.ndarray, pad: int, dy: int, dx: int, flip: bool) -> np.ndarray:
    """Zero-pad a (C, H, W) image by `pad`, take the (H, W) window at (dy, dx), mirror it."""
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=image.dtype)
    padded[:, pad : pad + h, pad : pad + w] = image
    window = padded[:, dy : dy + h, dx : dx + w]
    return window[:, :, ::-1] if flip else window


def test_padding_follows_the_image_size():
    assert [pad_for(s) for s in (32, 28, 14, 8)] == [4, 2, 1, 1]


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3), (14, 1)])
def test_augmented_batches_match_a_reference_crop_and_flip(size, channels):
    data = random_images(64, channels, size)
    pad = pad_for(size)
    x, _ = batch_for_step(data, 3, batch_size=16, seed=5)
    dy, dx, flip = augmentation(data, 3, batch_size=16, seed=5)
    index = batch_indices(data, 3, batch_size=16, seed=5)
    want = np.stack([reference_crop_flip(data.x_train[i].numpy(), pad, int(a), int(b), bool(f))
                     for i, a, b, f in zip(index, dy, dx, flip, strict=True)])
    want = (want / 255 - 0.5) / 0.25
    np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=1e-6)
    # the draws span the whole crop range and both flips over a few batches
    draws = [augmentation(data, s, batch_size=16, seed=5) for s in range(1, 9)]
    offsets = torch.cat([torch.cat([d[0], d[1]]) for d in draws])
    assert offsets.min() == 0 and offsets.max() == 2 * pad
    flips = torch.cat([d[2] for d in draws])
    assert 0 < flips.sum() < flips.numel()


def test_crop_and_flip_on_a_hand_made_image():
    image = torch.arange(1, 17, dtype=torch.uint8).reshape(1, 1, 4, 4)  # pad 1 at 4x4
    got = crop_and_flip(image, torch.tensor([0]), torch.tensor([2]), torch.tensor([True]))
    # padded rows 0..3 of columns 2..5 (zero column 5 on the right), then mirrored
    want = torch.tensor([[0, 0, 0, 0], [0, 4, 3, 2], [0, 8, 7, 6], [0, 12, 11, 10]],
                        dtype=torch.uint8)
    assert torch.equal(got[0, 0], want)


def test_augmentation_is_a_pure_function_of_seed_and_step():
    data = random_images(64, 1, 28)
    first = batch_for_step(data, 4, batch_size=16, seed=1)[0]
    assert torch.equal(first, batch_for_step(data, 4, batch_size=16, seed=1)[0])
    draws = {(seed, step): augmentation(data, step, batch_size=16, seed=seed)
             for seed in (1, 2) for step in (4, 5)}
    for a, b in [((1, 4), (1, 5)), ((1, 4), (2, 4))]:
        assert not all(torch.equal(u, v) for u, v in zip(draws[a], draws[b], strict=True))
    # the same image at two steps of different epochs gets a different crop or flip
    assert not torch.equal(
        batch_for_step(data, 1, batch_size=64, seed=1)[0].sum(0),
        batch_for_step(data, 2, batch_size=64, seed=1)[0].sum(0))


def test_augment_option_on_any_dataset():
    assert load("digits").augment is False
    assert load("digits", augment=True).augment is True
    assert load("digits", augment=True).x_train is load("digits").x_train  # no copy
    _, data = build(TrainConfig(augment=True))
    assert data.augment is True


def reference_area_resize(x: np.ndarray, size: int) -> np.ndarray:
    """Each output pixel the mean of the input pixels its cell overlaps (PyTorch's adaptive
    average pooling cells: rows floor(i*H/size) to ceil((i+1)*H/size))."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, size, size))
    for i in range(size):
        r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
        for j in range(size):
            c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].astype(np.float64).mean(axis=(2, 3))
    return np.rint(out).astype(np.uint8)


@pytest.mark.parametrize("size", [4, 5])
def test_resolution_resizes_both_splits(size):
    digits, small = load("digits"), load("digits", resolution=size)
    assert small.image_size == size
    assert tuple(small.x_train.shape) == (len(digits.x_train), 1, size, size)
    assert tuple(small.x_test.shape) == (len(digits.x_test), 1, size, size)
    for native, resized in ((digits.x_train, small.x_train), (digits.x_test, small.x_test)):
        np.testing.assert_array_equal(resized.numpy(), reference_area_resize(native.numpy(), size))
    if size == 4:  # 2x2 blocks: the reference is a plain reshape
        blocks = digits.x_train.numpy().reshape(-1, 1, 4, 2, 4, 2).astype(np.float64)
        np.testing.assert_array_equal(small.x_train.numpy(), np.rint(blocks.mean((3, 5))))
    pixels = small.x_train.numpy().astype(np.float64) / 255
    assert small.mean[0] == pytest.approx(pixels.mean()) and small.std[0] == pytest.approx(
        pixels.std())
    assert torch.equal(small.y_train, digits.y_train)


def test_resolution_out_of_range():
    for bad in (0, 9):
        with pytest.raises(ValueError, match="resolution must be in"):
            load("digits", resolution=bad)
    assert load("digits", resolution=8).x_train is load("digits").x_train


def test_record_with_augment_and_resolution(tmp_path):
    out = tmp_path / "run.zarr"
    result = CliRunner().invoke(app, [
        "record", "--model", "convnet", "--width", "4", "--steps", "6", "--batch-size", "32",
        "--schedule", "0:7:3", "--eval-schedule", "0:7:6", "--quiet", "--augment",
        "--resolution", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    history = ckpt_tools.open_history(out)
    config = TrainConfig.from_dict(history.attrs["ckpt_tools"]["config"])
    assert config.augment is True and config.resolution == 4
    # the stored weights were trained at 4x4: the first conv sees 4x4 inputs, so post-hoc
    # evaluation rebuilds the model on the resized test split
    _, data = build(config)
    assert data.image_size == 4 and data.augment is True
    bad = CliRunner().invoke(app, ["record", "--steps", "2", "--resolution", "0", "--quiet",
                                   "--out", str(tmp_path / "bad.zarr")])
    assert bad.exit_code == 2 and "resolution" in bad.output
