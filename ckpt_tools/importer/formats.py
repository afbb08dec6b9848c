"""Checkpoint files and folders in the formats people publish, read tensor by tensor.

A `Checkpoint` says where one checkpoint's tensors are (one file, or the shards an index
file lists) and what its metadata says about its step; `open_checkpoint` opens it for
reading without loading it: safetensors through `safe_open`, PyTorch pickles through
``torch.load(mmap=True, weights_only=True)``, so a tensor's bytes are read from disk only
when asked for. Recognised:

- ``*.pt``, ``*.pth``, ``*.bin``: a state dict saved by `torch.save` (or a dict holding
  one under ``state_dict``/``model_state_dict``/``model``/``module``, with an optional
  integer ``global_step``/``step``);
- ``*.ckpt``: a Lightning checkpoint (``state_dict``, step from ``global_step``);
- ``*.safetensors``: one safetensors file;
- a folder holding ``model.safetensors.index.json``, ``model.safetensors``,
  ``pytorch_model.bin.index.json`` or ``pytorch_model.bin`` (what ``save_pretrained``
  writes, a Transformers ``checkpoint-N/`` folder, a snapshot in the Hugging Face
  cache); the step comes from ``trainer_state.json`` (``global_step``) when present.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "find_checkpoints", "folder_checkpoint",
           "open_checkpoint"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
_TRAINER_FOLDER = re.compile(r"checkpoint-\d+")
_LAST = re.compile(r"last(-v\d+)?\.ckpt")
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")
_STEP_KEYS = ("global_step", "step")
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


class CheckpointError(ValueError):
    """A source is not a checkpoint ckpt-tools reads, or a series does not fit together.

    The message is one line naming the file and saying what to do.
    """


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: its name, shape and torch dtype (as text)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """Where one checkpoint's tensors are.

    Attributes:
        label: How messages name it (a path, or ``REPO@REVISION``).
        name: The text a step is read from when its metadata has none (a file's stem, a
            folder's name, a revision).
        kind: ``torch``, ``lightning``, ``safetensors``, ``safetensors-sharded``,
            ``torch-sharded``.
        files: The weight files (the shards, for an index).
        index: For sharded checkpoints, each tensor's shard (a path in `files`).
        step: The step its metadata gives (``trainer_state.json``), if any; the step of
            a PyTorch or Lightning file is read when it is opened.
        step_from: Where `step` came from.
        config: The folder's ``config.json``, if any (its model class is recorded).
    """

    label: str
    name: str
    kind: str
    files: tuple[Path, ...]
    index: tuple[tuple[str, Path], ...] | None = None
    step: int | None = None
    step_from: str | None = None
    config: Path | None = None


def _read_json(path: Path, label: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} of {label} is not readable JSON ({exc.__class__.__name__})"
                              ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} of {label} is not a JSON object")
    return data


def _index(folder: Path, index_file: str, label: str) -> tuple[tuple[str, Path], ...]:
    weight_map = _read_json(folder / index_file, label).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder / index_file} has no 'weight_map'; is it an index file?")
    out = []
    for tensor, shard in weight_map.items():
        # A shard is a plain file name next to the index: nothing can point elsewhere.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{folder / index_file} lists a shard {shard!r} that is not a "
                                  "file name in its folder")
        if not (folder / shard).is_file():
            raise CheckpointError(f"shard {shard} listed in {folder / index_file} is missing "
                                  f"({label} is incomplete)")
        out.append((tensor, folder / shard))
    return tuple(out)


def folder_checkpoint(folder: Path, *, name: str, label: str) -> Checkpoint | None:
    """The checkpoint saved in `folder` (see the module docstring), or None if none is."""
    found = next((f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if found is None:
        return None
    step = step_from = None
    state_file = folder / "trainer_state.json"
    if state_file.is_file():
        value = _read_json(state_file, label).get("global_step")
        if isinstance(value, int) and not isinstance(value, bool):
            step, step_from = value, "trainer_state.json"
    config = folder / "config.json"
    config = config if config.is_file() else None
    if found.endswith(".index.json"):
        index = _index(folder, found, label)
        files = tuple(dict.fromkeys(path for _, path in index))
        kind = "safetensors-sharded" if found.startswith("model.") else "torch-sharded"
        return Checkpoint(label, name, kind, files, index, step, step_from, config)
    kind = "safetensors" if found.endswith(".safetensors") else "torch"
    return Checkpoint(label, name, kind, (folder / found,), None, step, step_from, config)


def _file_checkpoint(path: Path) -> Checkpoint | None:
    if path.suffix == ".safetensors":
        return Checkpoint(str(path), path.stem, "safetensors", (path,))
    if path.suffix in TORCH_SUFFIXES:
        kind = "lightning" if path.suffix == ".ckpt" else "torch"
        return Checkpoint(str(path), path.stem, kind, (path,))
    return None


def _folder_checkpoints(source: Path) -> list[Checkpoint]:
    children = sorted(source.iterdir())
    # A Trainer's output folder may also hold the final model: its checkpoint-N/ folders
    # are the series.
    series = [c for p in children if p.is_dir() and _TRAINER_FOLDER.fullmatch(p.name)
              and (c := folder_checkpoint(p, name=p.name, label=str(p))) is not None]
    if series:
        return series
    ckpt = folder_checkpoint(source, name=source.name, label=str(source))
    if ckpt is not None:
        return [ckpt]
    # Lightning's last.ckpt repeats the newest checkpoint under another name.
    inside = [c for p in children if not _LAST.fullmatch(p.name)
              and (c := folder_checkpoint(p, name=p.name, label=str(p)) if p.is_dir()
                   else _file_checkpoint(p)) is not None]
    if not inside:
        raise CheckpointError(f"{source} holds no checkpoint ckpt import reads (files "
                              f"{', '.join(TORCH_SUFFIXES)}, .safetensors, or folders "
                              f"with {' or '.join(WEIGHT_FILES)})")
    return inside


def find_checkpoints(sources: list[Path]) -> list[Checkpoint]:
    """The checkpoints named by `sources`: files, checkpoint folders, or folders of them.

    A folder holding ``checkpoint-N/`` folders (a Trainer's output folder) stands for
    them; a folder that is neither that nor a checkpoint itself stands for the
    checkpoints directly inside it, except Lightning's ``last.ckpt`` (a copy of the
    newest).

    Raises:
        CheckpointError: a source is missing or holds no checkpoint of a known format.
    """
    found = []
    for source in sources:
        source = Path(source)
        if source.is_file() and source.name in WEIGHT_FILES:
            source = source.parent
        if not source.exists():
            raise CheckpointError(f"{source} does not exist")
        if source.is_dir():
            found.extend(_folder_checkpoints(source))
            continue
        ckpt = _file_checkpoint(source)
        if ckpt is None:
            raise CheckpointError(f"{source} is not a checkpoint ckpt import reads: use "
                                  f"{', '.join(TORCH_SUFFIXES)}, .safetensors files or "
                                  "folders saved by save_pretrained/Trainer")
        found.append(ckpt)
    return found


# -- reading ------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_load(path: Path, label: str):
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (legacy files: a pickle, protocol 2 or later).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(f"{label} is not a PyTorch checkpoint (neither the zip archive "
                              "nor the pickle that torch.save writes)")
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            # The legacy (pre-zip) format cannot be memory-mapped: it is read whole.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            reason = next((line.strip() for line in text.splitlines()
                           if "Unsupported" in line), "it holds Python objects")
            reason = reason.removeprefix("WeightsUnpickler error: ").split(" was not")[0]
            raise CheckpointError(
                f"{label}: torch.load(weights_only=True) refuses it ({reason}); ckpt import "
                "never runs code from a checkpoint: re-save its state_dict from a trusted "
                "session, or convert it to safetensors") from None
        raise CheckpointError(f"{label} is not a PyTorch checkpoint ({text[:80]})") from None
    except Exception as exc:  # torch raises several types for files that are not its own
        raise CheckpointError(f"{label} is not a PyTorch checkpoint torch.load can read "
                              f"({exc.__class__.__name__})") from None


def _state_dict(obj, label: str) -> tuple[dict[str, torch.Tensor], int | None, str | None]:
    def tensors_only(d) -> bool:
        return isinstance(d, dict) and bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if tensors_only(obj):
        return obj, None, None
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if tensors_only(obj.get(key)):
                for step_key in _STEP_KEYS:
                    value = obj.get(step_key)
                    if isinstance(value, int) and not isinstance(value, bool):
                        return obj[key], value, step_key
                return obj[key], None, None
    raise CheckpointError(f"{label} holds no state dict (a mapping of names to tensors, alone "
                          f"or under {'/'.join(_STATE_KEYS)}); is it a checkpoint?")


class OpenCheckpoint:
    """An opened checkpoint: its tensor table, its step metadata, and lazy reads."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.step, self.step_from = ckpt.step, ckpt.step_from
        self._torch: dict[str, torch.Tensor] = {}
        self._safe: dict[str, object] = {}  # tensor name -> safe_open handle
        self._stack = contextlib.ExitStack()
        self._dense: tuple[str | None, torch.Tensor | None] = (None, None)
        self.table: list[TensorInfo] = []
        try:
            for path in ckpt.files:
                self._open_file(path)
        except BaseException:
            self.close()
            raise
        if ckpt.index is not None:
            self._check_index()

    def _open_file(self, path: Path) -> None:
        where = self.ckpt.label if len(self.ckpt.files) == 1 else f"{path} of {self.ckpt.label}"
        # With an index, a shard contributes only the tensors the index assigns to it.
        keep = (None if self.ckpt.index is None
                else {n for n, shard in self.ckpt.index if shard == path})
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                stored = handle.keys()  # a list, not a mapping view
                names = [n for n in stored if keep is None or n in keep]
                infos = [self._safe_info(handle, n) for n in names]
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{where} is not a safetensors file "
                                      f"({str(exc).splitlines()[0][:80]})") from None
            for info in infos:
                self._safe[info.name] = handle
            self.table.extend(infos)
            return
        state, step, key = _state_dict(_torch_load(path, where), where)
        if keep is not None:
            state = {n: t for n, t in state.items() if n in keep}
        if step is not None and self.step is None:
            self.step, self.step_from = step, key
        self._torch.update(state)
        self.table.extend(TensorInfo(n, tuple(t.shape), _dtype_name(t.dtype))
                          for n, t in state.items())

    @staticmethod
    def _safe_info(handle, name: str) -> TensorInfo:
        piece = handle.get_slice(name)
        code = piece.get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor '{name}' has dtype {code}, which a float32 row "
                                  "cannot hold exactly")
        return TensorInfo(name, tuple(int(d) for d in piece.get_shape()),
                          _SAFETENSORS_DTYPES[code])

    def _check_index(self) -> None:
        where = dict(self.ckpt.index)
        held = {i.name for i in self.table}
        for name, shard in where.items():
            if name not in held:
                raise CheckpointError(f"{self.ckpt.label}: the index puts '{name}' in "
                                      f"{shard.name}, which does not hold it")

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor `name`, in its own dtype."""
        if name in self._torch:
            return self._torch[name]
        return self._safe[name].get_tensor(name)

    def flat(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Elements `lo:hi` of tensor `name` flattened in C order, in its own dtype.

        Reads only what it returns (plus at most one row of the tensor's first dimension
        at each end), from a memory map or through `safe_open`'s slices.
        """
        if name in self._torch:
            tensor = self._torch[name]
            if not tensor.is_contiguous():  # e.g. a transposed view was saved
                # Made contiguous once per tensor, not once per piece.
                if self._dense[0] != name:
                    self._dense = (name, tensor.contiguous())
                tensor = self._dense[1]
            return tensor.reshape(-1)[lo:hi]
        piece = self._safe[name].get_slice(name)
        shape = piece.get_shape()
        if len(shape) < 2:
            return self._safe[name].get_tensor(name).reshape(-1)[lo:hi]
        row = math.prod(shape[1:])
        first, last = lo // row, -(-hi // row)
        return piece[first:last].reshape(-1)[lo - first * row : hi - first * row]

    def close(self) -> None:
        """Release the files (memory maps close when the tensors are dropped)."""
        self._torch.clear()
        self._safe.clear()
        self._dense = (None, None)
        self._stack.close()

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(ckpt: Checkpoint) -> OpenCheckpoint:
    """Open `ckpt` for reading (a context manager).

    Raises:
        CheckpointError: a file is not of the format its name says, or a pickle holds
            anything but tensors and plain data.
    """
    return OpenCheckpoint(ckpt)
