import dataclasses
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_tools import batches as batches_module
from ckpt_tools import data as data_module
from ckpt_tools.batches import (
    batch_for_step,
    batch_indices,
    batches_per_epoch,
    normalize,
    test_batches,
)
from ckpt_tools.data import DATASET_NAMES, ImageData, load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def indexed(n: int, n_test: int = 10, augment: bool = False) -> ImageData:
    """A dataset whose label is the image's index, so a batch says which images it holds."""
    x = (torch.arange(n * 64) % 251).to(torch.uint8).reshape(n, 1, 8, 8)
    n_test = min(n, n_test)
    return ImageData(
        name="indexed",
        x_train=x,
        y_train=torch.arange(n),
        x_test=x[:n_test],
        y_test=torch.arange(n_test),
        num_classes=n,
        in_channels=1,
        image_size=8,
        mean=(0.5,),
        std=(0.25,),
        augment=augment,
    )


def reference_normalize(x: torch.Tensor, mean, std) -> np.ndarray:
    m = np.asarray(mean, dtype=np.float64)[:, None, None]
    s = np.asarray(std, dtype=np.float64)[:, None, None]
    return (x.numpy().astype(np.float64) / 255 - m) / s


# --- the embedded digits -------------------------------------------------------------


def test_digits_shapes_and_split(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == torch.uint8 and digits.y_train.dtype == torch.int64
    assert digits.y_test.shape == (360,) and digits.y_test.dtype == torch.int64
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert digits.augment is False
    assert int(digits.x_train.max()) == 255 and int(digits.x_train.min()) == 0
    assert set(digits.y_train.tolist()) == set(range(10))
    # Regression guard on the documented split (seed-0 numpy permutation).
    assert digits.y_train[:12].tolist() == [6, 6, 6, 2, 5, 6, 6, 2, 2, 1, 1, 9]


def test_digits_is_a_partition_of_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    expected = sorted(
        (np.rint(img * 255 / 16).astype(np.uint8).tobytes(), int(t))
        for img, t in zip(bunch.images, bunch.target, strict=True)
    )
    x = torch.cat([digits.x_train, digits.x_test]).numpy()
    y = torch.cat([digits.y_train, digits.y_test]).tolist()
    assert sorted((img[0].tobytes(), t) for img, t in zip(x, y, strict=True)) == expected


def test_stats_are_those_of_the_training_images(digits):
    pixels = digits.x_train.double() / 255
    assert digits.mean[0] == pytest.approx(pixels.mean().item(), rel=1e-12)
    assert digits.std[0] == pytest.approx(pixels.std(unbiased=False).item(), rel=1e-12)
    x = normalize(digits, digits.x_train)
    assert x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(0, abs=1e-5)
    assert x.std().item() == pytest.approx(1, abs=1e-3)


def test_image_data_checks_dtypes(digits):
    with pytest.raises(ValueError, match="uint8"):
        dataclasses.replace(digits, x_train=digits.x_train.float())
    with pytest.raises(ValueError, match="int64"):
        dataclasses.replace(digits, y_test=digits.y_test.int())


# --- deterministic batches -----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), data=st.data(), seed=st.integers(-(2**40), 2**40))
def test_each_epoch_covers_distinct_images(n, data, seed):
    batch_size = data.draw(st.integers(1, n))
    dataset = indexed(n)
    per_epoch = batches_per_epoch(dataset, batch_size)
    assert per_epoch == n // batch_size
    for epoch in range(2):
        seen = [
            batch_for_step(dataset, epoch * per_epoch + p + 1, batch_size=batch_size, seed=seed)[1]
            for p in range(per_epoch)
        ]
        ids = torch.cat(seen).tolist()
        assert all(len(b) == batch_size for b in seen)
        assert len(ids) == len(set(ids)) == per_epoch * batch_size
        assert set(ids) <= set(range(n))


def test_batches_depend_only_on_seed_and_step():
    dataset = indexed(100)
    steps = list(range(1, 40))  # several epochs of 9 batches
    forward = [batch_for_step(dataset, s, batch_size=11, seed=3) for s in steps]
    batches_module._epoch_order.cache_clear()
    backward = [batch_for_step(dataset, s, batch_size=11, seed=3) for s in reversed(steps)]
    for (xa, ya), (xb, yb) in zip(forward, reversed(backward), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_seed = batch_for_step(dataset, 1, batch_size=11, seed=4)[1]
    assert not torch.equal(forward[0][1], other_seed)
    # Epochs are reshuffled: the first batch of epoch 2 is not that of epoch 1.
    assert not torch.equal(forward[0][1], forward[9][1])
    # The images are those of the labels, normalised.
    x, y = forward[5]
    expected = reference_normalize(dataset.x_train[y], dataset.mean, dataset.std)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_batch_indices_name_the_examples_of_each_batch():
    # In `indexed`, an image's label is its index: the ids must be the batch's labels.
    for train, n in ((True, 100), (False, 30)):
        dataset = indexed(100, n_test=30, augment=True)
        for step in (1, 5, 9, 10, 23):
            ids = batch_indices(dataset, step, batch_size=11, seed=3, train=train)
            _, y = batch_for_step(dataset, step, batch_size=11, seed=3, train=train)
            assert ids.dtype == torch.int64 and torch.equal(ids, y), (train, step)
            assert ids.max() < n
    with pytest.raises(ValueError, match="1-based"):
        batch_indices(indexed(10), 0, batch_size=2, seed=0)


def test_test_split_batches_are_not_augmented():
    dataset = indexed(40, n_test=30, augment=True)
    x, y = batch_for_step(dataset, 4, batch_size=7, seed=0, train=False)
    assert int(y.max()) < 30
    np.testing.assert_allclose(
        x.numpy(), reference_normalize(dataset.x_test[y], dataset.mean, dataset.std), atol=1e-6
    )


def test_augmentation_is_a_crop_and_maybe_a_flip(digits):
    augmented = dataclasses.replace(digits, augment=True)
    x, y = batch_for_step(augmented, 7, batch_size=16, seed=1)
    x_again, _ = batch_for_step(augmented, 7, batch_size=16, seed=1)
    plain, y_plain = batch_for_step(digits, 7, batch_size=16, seed=1)
    assert x.shape == plain.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, x_again) and torch.equal(y, y_plain)
    assert not torch.equal(x, plain)
    # Which images were drawn, recovered from the un-augmented batch.
    originals = [
        np.rint(((p * digits.std[0] + digits.mean[0]) * 255).numpy()).astype(np.uint8)
        for p in plain
    ]
    for image, original in zip(x, originals, strict=True):
        padded = np.pad(original, ((0, 0), (1, 1), (1, 1)))  # padding 1 at 8x8
        candidates = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        candidates += [c[:, :, ::-1] for c in candidates]
        target = reference_normalize(
            torch.from_numpy(np.stack(candidates)), digits.mean, digits.std
        )
        assert np.abs(target - image.numpy()).max(axis=(1, 2, 3)).min() < 1e-5


def test_test_batches_cover_the_test_split_in_order(digits):
    chunks = list(test_batches(digits, 100))
    assert [len(y) for _, y in chunks] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([y for _, y in chunks]), digits.y_test)
    x = torch.cat([x for x, _ in chunks])
    expected = reference_normalize(digits.x_test, digits.mean, digits.std)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_batch_argument_errors(digits):
    with pytest.raises(ValueError, match="1-based"):
        batch_for_step(digits, 0, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        batches_per_epoch(digits, 2000)
    with pytest.raises(ValueError, match="batch_size"):
        batch_for_step(digits, 1, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        normalize(digits, digits.x_train.float())


# --- files in the real on-disk formats -----------------------------------------------


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """IDX (LeCun's MNIST format): 0, 0, type 0x08 (uint8), ndim; big-endian sizes; bytes."""
    payload = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    payload += struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
    path.write_bytes(gzip.compress(payload) if compress else payload)


def idx_arrays(seed: int):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 7),
        rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 3),
    )


def write_idx_set(folder, arrays, compress: bool = False) -> None:
    stems = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    for stem, array in zip(stems, arrays, strict=True):
        write_idx(folder / stem, array, compress)


def assert_loaded(dataset: ImageData, x_train, y_train, x_test, y_test) -> None:
    assert dataset.x_train.dtype == torch.uint8 and dataset.y_train.dtype == torch.int64
    np.testing.assert_array_equal(dataset.x_train.numpy(), x_train)
    np.testing.assert_array_equal(dataset.y_train.numpy(), y_train)
    np.testing.assert_array_equal(dataset.x_test.numpy(), x_test)
    np.testing.assert_array_equal(dataset.y_test.numpy(), y_test)


def test_mnist_in_torchvision_layout(tmp_path):
    x_train, y_train, x_test, y_test = idx_arrays(0)
    write_idx_set(tmp_path / "MNIST" / "raw", (x_train, y_train, x_test, y_test))
    dataset = load("mnist", root=tmp_path)
    assert_loaded(dataset, x_train[:, None], y_train, x_test[:, None], y_test)
    assert (dataset.num_classes, dataset.in_channels, dataset.image_size) == (10, 1, 28)
    assert dataset.augment is False


def test_fashion_mnist_flat_gzipped_like_debian(tmp_path):
    x_train, y_train, x_test, y_test = idx_arrays(1)
    write_idx_set(tmp_path, (x_train, y_train, x_test, y_test), compress=True)
    dataset = load("fashion-mnist", root=str(tmp_path))
    assert_loaded(dataset, x_train[:, None], y_train, x_test[:, None], y_test)


def test_corrupt_idx_file(tmp_path):
    write_idx_set(tmp_path, idx_arrays(2))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x08\x03\x00\x01garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        load("mnist", root=tmp_path)


def write_cifar(folder, files, label_key: str, num_classes: int, seed: int):
    """The CIFAR 'python version': pickled dicts with uint8 data (n, 3072) and label lists."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate(files):
        n = 2 + i
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, num_classes, n).tolist()
        entry = {
            "batch_label": f"batch {i}",
            label_key: y,
            "data": x,
            "filenames": [f"img{j}.png" for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        xs.append(x.reshape(n, 3, 32, 32))
        ys.extend(y)
    return np.concatenate(xs), np.asarray(ys)


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    train = write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)], "labels", 10, 0)
    test = write_cifar(folder, ["test_batch"], "labels", 10, 1)
    dataset = load("cifar10", root=tmp_path)
    assert_loaded(dataset, *train, *test)
    assert (dataset.num_classes, dataset.in_channels, dataset.image_size) == (10, 3, 32)
    assert dataset.augment is True
    x, _ = batch_for_step(dataset, 3, batch_size=5, seed=0)
    assert x.shape == (5, 3, 32, 32)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    train = write_cifar(folder, ["train"], "fine_labels", 100, 0)
    test = write_cifar(folder, ["test"], "fine_labels", 100, 1)
    dataset = load("cifar100", root=tmp_path)
    assert_loaded(dataset, *train, *test)
    assert dataset.num_classes == 100


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a data file",))

    for name in ["train", "test"]:
        (folder / name).write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load("cifar100", root=tmp_path)


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    raw = {}
    for name, n in [("train_32x32.mat", 4), ("test_32x32.mat", 3)]:
        raw[name] = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N)
        y = np.array([[10], [1], [9], [10]][:n], dtype=np.uint8)  # 10 is the digit 0
        savemat(tmp_path / name, {"X": raw[name], "y": y})
    dataset = load("svhn", root=tmp_path)
    assert dataset.y_train.tolist() == [0, 1, 9, 0] and dataset.y_test.tolist() == [0, 1, 9]
    assert dataset.x_train.shape == (4, 3, 32, 32) and dataset.x_test.shape == (3, 3, 32, 32)
    for h, w, c, i in [(0, 0, 0, 0), (5, 7, 2, 1), (31, 3, 1, 2), (2, 30, 0, 3)]:
        assert int(dataset.x_train[i, c, h, w]) == int(raw["train_32x32.mat"][h, w, c, i])
    test_pixel = torch.from_numpy(raw["test_32x32.mat"][4, 9, :, 2])
    assert torch.equal(dataset.x_test[2, :, 4, 9], test_pixel)


def test_download_asks_torchvision_then_reads(tmp_path, monkeypatch):
    import torchvision.datasets

    arrays = idx_arrays(3)
    calls = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_idx_set(tmp_path / "MNIST" / "raw", arrays)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    dataset = load("mnist", root=tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert len(dataset.y_train) == 7


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "train-images-idx3-ubyte[.gz]"),
        ("cifar10", "data_batch_1"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_files_say_what_where_and_how(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as info:
        load(name, root=tmp_path / "nowhere")
    message = str(info.value)
    assert "\n" not in message
    assert expected in message and str(tmp_path / "nowhere") in message
    assert "--data-root" in message


def test_no_root(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root DIR"):
        load("cifar10")
    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load("fashion-mnist")
    assert str(tmp_path / "absent") in str(info.value) and "\n" not in str(info.value)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="known datasets: cifar10, cifar100, digits"):
        load("imagenet")
    assert DATASET_NAMES == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist", "svhn"]


@pytest.mark.skipif(
    not (data_module.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist():
    dataset = load("fashion-mnist")
    assert dataset.x_train.shape == (60000, 1, 28, 28)
    assert dataset.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(dataset.y_train).tolist() == [6000] * 10
    assert torch.bincount(dataset.y_test).tolist() == [1000] * 10
    assert dataset.mean[0] == pytest.approx(0.2860, abs=1e-4)  # the published statistics
    assert dataset.std[0] == pytest.approx(0.3530, abs=1e-4)
