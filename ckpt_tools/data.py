"""Image classification datasets, held whole in memory as uint8 tensors.

``load(name)`` returns an ``ImageData``. Names and sources:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no network).
  Pixel values 0..16 are rescaled to 0..255 (rounded). Split: the first 1,437 indices of
  ``numpy.random.default_rng(0).permutation(1797)`` train, the other 360 test.
- ``mnist``, ``fashion-mnist``: IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  plain or ``.gz``, in ``ROOT/MNIST/raw`` (``ROOT/FashionMNIST/raw``; torchvision's layout)
  or in ``ROOT`` itself. With no root, ``fashion-mnist`` is read from where Debian's
  ``dataset-fashion-mnist`` package puts it (``/usr/share/datasets/fashion-mnist``).
- ``cifar10``, ``cifar100``: the "python version" batches in ``ROOT/cifar-10-batches-py``
  and ``ROOT/cifar-100-python`` (fine labels).
- ``svhn``: ``ROOT/train_32x32.mat`` and ``ROOT/test_32x32.mat`` (label 10 read as 0).

The files are those torchvision downloads (``download=True`` asks torchvision to fetch
them into ``root``), but they are read here directly rather than through torchvision's
dataset classes: those check md5 sums (so tiny test files in the real format would be
rejected), want MNIST unzipped under ``ROOT/<Class>/raw`` (Debian ships flat ``.gz``
files) and serve PIL images one at a time. CIFAR pickles are read with an unpickler that
only rebuilds numpy arrays, so a hostile file cannot run code.

``mean``/``std`` are per-channel statistics of the training images in [0, 1] units,
computed at load time (population std).

Options of ``load``: ``augment`` turns the random crop and flip of training batches (see
`ckpt_tools.batches`) on or off for any dataset (default: on for CIFAR and SVHN only);
``resolution`` shrinks every image to ``resolution x resolution`` pixels by area
averaging (each output pixel the mean of the input pixels it covers, rounded half to
even back to uint8), e.g. 28 -> 14 for cheaper converged runs on CPUs.
"""

import dataclasses
import functools
import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASET_NAMES", "DEBIAN_FASHION_MNIST", "ImageData", "load"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# name -> (num_classes, augment with random crop + flip, torchvision class for download)
_SPECS: dict[str, tuple[int, bool, str]] = {
    "digits": (10, False, ""),
    "mnist": (10, False, "MNIST"),
    "fashion-mnist": (10, False, "FashionMNIST"),
    "cifar10": (10, True, "CIFAR10"),
    "cifar100": (100, True, "CIFAR100"),
    "svhn": (10, True, "SVHN"),
}
DATASET_NAMES: list[str] = sorted(_SPECS)

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR = {  # name -> (folder, train files, test files, label key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")

_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


@dataclass(frozen=True, eq=False)
class ImageData:
    """A dataset split into train and test, in memory.

    Attributes:
        name: dataset name as given to ``load``.
        x_train: (N_train, C, H, W) uint8 pixels, 0..255.
        y_train: (N_train,) int64 labels in [0, num_classes).
        x_test: (N_test, C, H, W) uint8.
        y_test: (N_test,) int64.
        num_classes: number of classes.
        in_channels: C.
        image_size: H = W.
        mean: per-channel mean of ``x_train / 255``.
        std: per-channel std of ``x_train / 255``.
        augment: whether training batches get a random crop (padding 4) and a random
            horizontal flip (CIFAR/SVHN style).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    def __post_init__(self) -> None:
        for x, y in [(self.x_train, self.y_train), (self.x_test, self.y_test)]:
            shape = (self.in_channels, self.image_size, self.image_size)
            if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"{self.name}: images must be uint8 (N, *{shape}), got "
                    f"{x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or tuple(y.shape) != (len(x),):
                raise ValueError(
                    f"{self.name}: labels must be int64 ({len(x)},), got {y.dtype} {tuple(y.shape)}"
                )


def load(
    name: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    augment: bool | None = None,
    resolution: int | None = None,
) -> ImageData:
    """Load a dataset whole into memory.

    Args:
        name: one of ``DATASET_NAMES``.
        root: folder holding the files (see the module docstring); ignored for ``digits``.
            None: only ``digits`` and (Debian package installed) ``fashion-mnist`` load.
        download: let torchvision fetch missing files into ``root`` first (needs a network).
        augment: random crop and flip of training batches; None: the dataset's default
            (CIFAR and SVHN only).
        resolution: image side in pixels after area-averaging both splits down (at most
            the native size); None: native. ``mean``/``std`` are those of the result.

    Returns:
        The dataset, images uint8 (N, C, H, W), labels int64. Loaded once per process
        and (root); later calls return the same tensors, so do not modify them in place.

    Raises:
        ValueError: unknown name (the message lists the known ones), a malformed file, or
            a resolution outside ``[1, native size]``.
        FileNotFoundError: files missing; the one-line message says which, where, and how
            to get them.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    if download:
        if root is None:
            raise ValueError(f"{name}: download=True needs a root folder to download into")
        _download(_SPECS[name][2], Path(root))
    root = None if root is None else str(Path(root).resolve())
    data = _load(name, root) if resolution is None else _resized(name, root, resolution)
    if augment is not None and augment != data.augment:
        data = dataclasses.replace(data, augment=augment)
    return data


@functools.lru_cache(maxsize=4)
def _resized(name: str, root: str | None, resolution: int) -> ImageData:
    data = _load(name, root)
    if not 1 <= resolution <= data.image_size:
        raise ValueError(f"{name}: resolution must be in [1, {data.image_size}] (the native "
                         f"size), got {resolution}")
    if resolution == data.image_size:
        return data
    x_train, x_test = (_area_resize(x, resolution) for x in (data.x_train, data.x_test))
    mean, std = _channel_stats(x_train)
    return dataclasses.replace(data, x_train=x_train, x_test=x_test, image_size=resolution,
                               mean=mean, std=std)


def _area_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    # (N, C, H, W) uint8 -> (N, C, size, size) uint8, in slices to bound the float copy.
    out = torch.empty((*x.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(x), 4096):
        part = x[start : start + 4096].float()
        small = torch.nn.functional.interpolate(part, size=(size, size), mode="area")
        out[start : start + 4096] = small.round().clamp_(0, 255).to(torch.uint8)
    return out


@functools.lru_cache(maxsize=4)
def _load(name: str, root: str | None) -> ImageData:
    # Cached per process: experiments build a model and its data for every run they train.
    # The tensors are shared between calls, and nothing in ckpt-tools modifies them in place.
    num_classes, augment, torchvision_class = _SPECS[name]
    if name == "digits":
        arrays = _read_digits()
    else:
        if name in ("mnist", "fashion-mnist"):
            arrays = _read_idx_set(name, torchvision_class, root)
        elif name in _CIFAR:
            arrays = _read_cifar(name, _require_root(name, root))
        else:
            arrays = _read_svhn(_require_root(name, root))
    x_train, y_train, x_test, y_test = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    mean, std = _channel_stats(x_train)
    return ImageData(
        name=name,
        x_train=x_train,
        y_train=y_train.long(),
        x_test=x_test,
        y_test=y_test.long(),
        num_classes=num_classes,
        in_channels=x_train.shape[1],
        image_size=x_train.shape[2],
        mean=mean,
        std=std,
        augment=augment,
    )


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # A 256-bin histogram per channel gives exact moments without a float copy of the data.
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(x.shape[1]):
        counts = torch.bincount(x[:, channel].reshape(-1), minlength=256).double()
        mean = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - mean) ** 2).sum() / counts.sum())
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


def _read_digits() -> _Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1437], order[1437:]
    return x[train], y[train], x[test], y[test]


def _require_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise FileNotFoundError(
            f"{name}: no data root given; pass root=DIR (--data-root DIR) holding the files "
            f"torchvision downloads, or download=True with a network"
        )
    return Path(root)


def _missing(name: str, files: list[str], dirs: list[Path], hint: str) -> FileNotFoundError:
    where = " or ".join(str(d) for d in dirs)
    return FileNotFoundError(f"{name}: expected {', '.join(files)} in {where}; {hint}")


def _read_idx_set(name: str, folder: str, root: str | Path | None) -> _Arrays:
    if root is None and name == "fashion-mnist":
        dirs = [DEBIAN_FASHION_MNIST]
        hint = "install them with `apt-get install dataset-fashion-mnist`, or pass --data-root DIR"
    else:
        base = _require_root(name, root)
        dirs = [base / folder / "raw", base]
        hint = "pass --data-root DIR with these files, or download=True with a network"
        if name == "fashion-mnist":
            hint += " (Debian: `apt-get install dataset-fashion-mnist` and no root)"
    for directory in dirs:
        paths = [_plain_or_gz(directory / stem) for stem in _IDX_FILES]
        if all(p is not None for p in paths):
            x_train, y_train, x_test, y_test = (_read_idx(p) for p in paths)
            return x_train[:, None], y_train, x_test[:, None], y_test
    raise _missing(name, [f"{stem}[.gz]" for stem in _IDX_FILES], dirs, hint)


def _plain_or_gz(path: Path) -> Path | None:
    gz = path.with_name(path.name + ".gz")
    return path if path.is_file() else gz if gz.is_file() else None


def _read_idx(path: Path) -> np.ndarray:
    # IDX: two zero bytes, a type byte, ndim; ndim big-endian uint32 sizes; the data.
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    zeros, code, ndim = struct.unpack(">HBB", raw[:4]) if len(raw) >= 4 else (1, 0, 0)
    if zeros != 0 or code not in _IDX_DTYPES or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: not an IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, holds {data.size} values")
    return data.reshape(shape).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: no code from the file runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_cifar(name: str, root: Path) -> _Arrays:
    folder, train_files, test_files, label_key = _CIFAR[name]
    dirs = [root / folder, root]
    for directory in dirs:
        if all((directory / f).is_file() for f in train_files + test_files):
            train = [_read_cifar_batch(directory / f, label_key) for f in train_files]
            test = [_read_cifar_batch(directory / f, label_key) for f in test_files]
            return (
                np.concatenate([x for x, _ in train]),
                np.concatenate([y for _, y in train]),
                np.concatenate([x for x, _ in test]),
                np.concatenate([y for _, y in test]),
            )
    hint = "pass --data-root DIR with the python-version batches, or download=True with a network"
    raise _missing(name, train_files + test_files, dirs, hint)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    entry = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(entry[label_key], dtype=np.int64)


def _read_svhn(root: Path) -> _Arrays:
    from scipy.io import loadmat

    if not all((root / f).is_file() for f in _SVHN_FILES):
        hint = "pass --data-root DIR with these files, or download=True with a network"
        raise _missing("svhn", list(_SVHN_FILES), [root], hint)
    arrays = []
    for filename in _SVHN_FILES:
        mat = loadmat(root / filename)
        x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)  # (H, W, C, N) -> (N, C, H, W)
        y = mat["y"].astype(np.int64).reshape(-1)
        arrays += [x, np.where(y == 10, 0, y)]  # SVHN labels the digit 0 as 10
    return tuple(arrays)


def _download(torchvision_class: str, root: Path) -> None:
    from torchvision import datasets

    cls = getattr(datasets, torchvision_class)
    for train in (True, False):
        if torchvision_class == "SVHN":
            cls(str(root), split="train" if train else "test", download=True)
        else:
            cls(str(root), train=train, download=True)
