"""A series of checkpoints checked before anything is written: steps, order, architecture.

Every checkpoint is opened once (lazily: only the tensor tables and metadata are read,
plus the values of tensors whose dtype a float32 row might not hold exactly), so a bad
file, a mixed architecture or an ambiguous step is refused before the store is touched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ckpt_tools.importer.formats import (
    Checkpoint,
    CheckpointError,
    OpenCheckpoint,
    TensorInfo,
    open_checkpoint,
)
from ckpt_tools.tensors import TensorSpec

__all__ = ["DEFAULT_STEP_REGEX", "Row", "Series", "plan_series"]

DEFAULT_STEP_REGEX = r"(\d+)(?!.*\d)"
"""The last number in a name: ``checkpoint-500``, ``step1000``, ``epoch=2-step=300``."""

_EXACT = {"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "bool", "uint8",
          "int8", "int16"}  # every value of these dtypes is a float32
_BUFFER_NAMES = {"running_mean", "running_var", "num_batches_tracked"}
_INT_EXACT = 1 << 24  # integers up to 2**24 are exact in float32


@dataclass(frozen=True)
class Row:
    """One checkpoint of the series and the step it is stored at."""

    checkpoint: Checkpoint
    step: int
    step_from: str  # "trainer_state.json", "global_step", "name", ...


@dataclass(frozen=True)
class Series:
    """A checked series, in the order its rows are stored.

    Attributes:
        rows: The checkpoints with their steps.
        params, buffers: The tensor tables of every row (see `ckpt_tools.tensors`).
        notes: What a user should know (a name that disagrees with its metadata).
    """

    rows: tuple[Row, ...]
    params: tuple[TensorSpec, ...]
    buffers: tuple[TensorSpec, ...]
    notes: tuple[str, ...]


def _name_step(ckpt: Checkpoint, pattern: re.Pattern) -> int | None:
    match = pattern.search(ckpt.name)
    if match is None:
        return None
    text = match.group(1) if pattern.groups else match.group(0)
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"--step-regex matched {text!r} in {ckpt.name!r}, which is not "
                              "an integer step") from None


def _mismatch(first: list[TensorInfo], table: list[TensorInfo]) -> str | None:
    here = {i.name: i for i in table}
    for ref in first:
        got = here.get(ref.name)
        if got is None:
            return f"it has no tensor '{ref.name}'"
        if got.shape != ref.shape:
            return f"tensor '{ref.name}' has shape {got.shape}, not {ref.shape}"
        if got.dtype != ref.dtype:
            return f"tensor '{ref.name}' is {got.dtype}, not {ref.dtype}"
    known = {i.name for i in first}
    extra = next((i.name for i in table if i.name not in known), None)
    return f"it has a tensor '{extra}' that the first does not" if extra else None


def _check_exact(opened: OpenCheckpoint, table: list[TensorInfo]) -> None:
    for info in table:
        if info.dtype in _EXACT:
            continue
        t = opened.tensor(info.name)
        if t.is_floating_point():
            back = t.to(torch.float32).to(t.dtype)
            ok = bool(((back == t) | (torch.isnan(t) & torch.isnan(back))).all())
        elif t.is_complex():
            ok = False
        else:
            ok = bool((t.abs() <= _INT_EXACT).all()) if t.numel() else True
        if not ok:
            raise CheckpointError(
                f"{opened.ckpt.label}: tensor '{info.name}' ({info.dtype}) holds values a "
                "float32 row cannot store exactly; ckpt-tools stores float32 rows")


def _specs(table: list[TensorInfo]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    # A file does not say which tensors are parameters: integer tensors and BatchNorm
    # statistics are buffers, every other floating-point tensor a parameter. Prunable
    # follows what IMP prunes in a model: weights of two or more dimensions.
    def is_buffer(i: TensorInfo) -> bool:
        return (i.name.rpartition(".")[2] in _BUFFER_NAMES
                or not getattr(torch, i.dtype).is_floating_point)

    out = []
    for chosen in ([i for i in table if not is_buffer(i)], [i for i in table if is_buffer(i)]):
        offset, specs = 0, []
        for i in chosen:
            prunable = len(i.shape) >= 2 and i.name.rpartition(".")[2] == "weight"
            specs.append(TensorSpec(i.name, i.shape, offset, i.dtype, prunable))
            offset += i.size
        out.append(tuple(specs))
    return out[0], out[1]


def plan_series(checkpoints: Sequence[Checkpoint], *, step_regex: str | None = None) -> Series:
    """Open every checkpoint of the series once and decide each one's step and row.

    A step comes from the checkpoint's metadata where it has one (``trainer_state.json``,
    Lightning's ``global_step``), otherwise from its name (the last number, or the first
    group of `step_regex`). Rows are stored in the order of the steps in the names when
    every name has one (so a shell's ``checkpoint-1000`` before ``checkpoint-200`` does
    not matter), otherwise in the order given; the integrity checks then flag steps out of
    order, which is what a checkpoint whose metadata disagrees with its name shows.

    Raises:
        CheckpointError: a source is unreadable or not a checkpoint, the architectures
            differ (naming the first differing tensor and the file), a step cannot be
            told, or two checkpoints hold the same step.
    """
    if not checkpoints:
        raise CheckpointError("no checkpoints to import; pass files, folders or --hf-repo")
    try:
        pattern = re.compile(step_regex or DEFAULT_STEP_REGEX)
    except re.error as exc:
        raise CheckpointError(f"--step-regex {step_regex!r} is not a regular expression: {exc}"
                              ) from None
    first: list[TensorInfo] | None = None
    found, notes = [], []
    for ckpt in checkpoints:
        with open_checkpoint(ckpt) as opened:
            table = opened.table
            if not table:
                raise CheckpointError(f"{ckpt.label} holds no tensors")
            if first is None:
                first = table
            else:
                problem = _mismatch(first, table)
                if problem:
                    raise CheckpointError(
                        f"{ckpt.label} has another architecture than {checkpoints[0].label}: "
                        f"{problem}; import each architecture into its own group")
            _check_exact(opened, table)
            meta_step, meta_from = opened.step, opened.step_from
        named = _name_step(ckpt, pattern)
        if meta_step is not None and named is not None and meta_step != named:
            notes.append(f"{ckpt.label}: its {meta_from} says step {meta_step}, its name "
                         f"{named}; using {meta_step}")
        if meta_step is None and named is None:
            raise CheckpointError(f"cannot tell the step of {ckpt.label}: its metadata has none "
                                  "and its name no number; pass --step-regex")
        step, source = (meta_step, meta_from) if meta_step is not None else (named, "name")
        if step < 0:
            raise CheckpointError(f"{ckpt.label} gives a negative step ({step})")
        found.append((named, Row(ckpt, step, source)))
    if all(named is not None for named, _ in found):
        found.sort(key=lambda item: item[0])
    rows = tuple(row for _, row in found)
    seen: dict[int, Row] = {}
    for row in rows:
        if row.step in seen:
            raise CheckpointError(f"{seen[row.step].checkpoint.label} and {row.checkpoint.label} "
                                  f"both hold step {row.step}; import them into separate groups")
        seen[row.step] = row
    params, buffers = _specs(first)
    return Series(rows, params, buffers, tuple(notes))
