"""The contract every experiment that trains from a store fulfils.

An experiment is one module defining ``EXPERIMENT = Experiment(...)`` and one line in
`ckpt_tools.analyses.experiments.registry.EXPERIMENTS`; ``ckpt <name>`` then exists, its
options generated from the settings dataclass (as open_lth builds its argparse from its
hyperparameter dataclasses). The parts:

- settings: a frozen dataclass; each field declared with `setting` (its help text, and
  how the command line spells it), validated in ``__post_init__``;
- run: ``run(store, settings, progress) -> summary``, training what is missing and
  storing the summary as the result ``analyses/<summary_name>``;
- summary: ``summary(store) -> Dataset``, gathered from the store's groups;
- groups: every group lives under ``experiments/<name>/``, named by `group` from
  ``key_value`` parts and parsed back by `parse_group`;
- presets: named partial settings (``--preset``), typed by the settings' own fields.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import xarray as xr

__all__ = ["Experiment", "Progress", "SummaryTable", "option_name", "parse_seeds", "setting"]

Progress = Callable[[str], None]  # one line of progress for the user


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,  # noqa: A002  (the word the CLI uses)
    option: str | None = None,
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A settings field with what the command line needs to offer it.

    Args:
        default: The default (leave out for a required setting).
        help: One line of help text (rendered literally).
        option: The option's name, e.g. ``"--rewind"`` (default: ``--`` and the field
            name with dashes).
        parse: Turns the option's text into the value (the option then takes text).
        flag: For booleans, the ``"--on/--off"`` pair (default ``--name/--no-name``).
        choices: The values a text setting (or each item of a tuple) may take, offered
            as a choice (``Literal`` types are choices already).
    """
    metadata = {"help": help, "option": option, "parse": parse, "flag": flag,
                "choices": choices}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    if isinstance(default, list | dict | set):
        raise TypeError("settings defaults must be immutable (use a tuple)")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SummaryTable:
    """What the command prints after a run: a table of the summary and a closing line.

    Attributes:
        title: The table's title.
        columns: Column headings.
        rows: One tuple of formatted cells per row.
        note: The closing line (default: where the summary is stored).
    """

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    note: str = ""


@dataclass(frozen=True)
class Experiment:
    """One experiment that trains from a recorded store.

    Attributes:
        name: The command (``ckpt <name>``) and the folder of its groups,
            ``experiments/<name>/``.
        help: One line describing it (the command's help).
        settings: The settings dataclass (frozen; fields declared with `setting`).
        run: ``run(store, settings, progress) -> summary``.
        summary: ``summary(store) -> Dataset`` gathered from the store's groups.
        summary_name: The result holding the stored summary (``analyses/<summary_name>``).
        presets: ``{preset name: {field: value}}``, or a function returning it (read when
            first needed, so presets can live in one module that imports the settings);
            options given override them.
        describe: ``describe(summary, settings) -> SummaryTable``, what the command prints
            after a run (default: only where the summary is stored).
    """

    name: str
    help: str
    settings: type
    run: Callable[[Path, Any, Progress], xr.Dataset]
    summary: Callable[[Path], xr.Dataset]
    summary_name: str
    presets: Mapping[str, Mapping[str, Any]] | Callable[[], Mapping] = field(
        default_factory=dict)
    describe: Callable[[xr.Dataset, Any], SummaryTable] | None = None

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9-]*", self.name):
            raise ValueError(f"experiment names are lowercase words, got {self.name!r}")
        if not (dataclasses.is_dataclass(self.settings)
                and self.settings.__dataclass_params__.frozen):
            raise TypeError(f"{self.name}: settings must be a frozen dataclass")
        if not callable(self.presets):
            self.preset_values()  # refuse bad presets when the experiment is declared

    def preset_values(self) -> Mapping[str, Mapping[str, Any]]:
        """The presets, checked against the settings' fields.

        Raises:
            ValueError: a preset sets a field the settings do not have.
        """
        presets = self.presets() if callable(self.presets) else self.presets
        known = {f.name for f in dataclasses.fields(self.settings)}
        for preset, values in presets.items():
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"{self.name} preset {preset!r} sets unknown fields "
                                 f"{sorted(unknown)}")
        return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in presets.items()})

    @property
    def prefix(self) -> str:
        """The group every group of this experiment lives under."""
        return f"experiments/{self.name}"

    def group(self, **parts: int | str) -> str:
        """The group named by `parts`, in order.

        ``group(rewind=2, seed=0)`` is ``experiments/<name>/rewind_2/seed_0``.
        """
        return "/".join([self.prefix, *(f"{k}_{v}" for k, v in parts.items())])

    def parse_group(self, group: str, *keys: str) -> dict[str, str] | None:
        """Inverse of `group` for the parts `keys`; None when `group` is not one of them."""
        pattern = "/".join([re.escape(self.prefix), *(fr"{k}_(?P<{k}>[^/]+)" for k in keys)])
        match = re.fullmatch(pattern, group)
        return None if match is None else match.groupdict()

    def make_settings(self, preset: str | None = None, **given: Any):
        """Settings from a preset (if any) with the `given` values on top.

        Raises:
            ValueError: unknown preset, or settings the dataclass refuses.
            TypeError: a required setting is missing (the message names its options).
        """
        values: dict[str, Any] = {}
        presets = self.preset_values()
        if preset is not None:
            if preset not in presets:
                raise ValueError(f"unknown preset {preset!r}; known: {', '.join(presets)}")
            values.update(presets[preset])
        values.update(given)
        missing = [f for f in dataclasses.fields(self.settings)
                   if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            names = " and ".join(option_name(f) for f in missing)
            hint = f" (or give --preset {'|'.join(presets)})" if presets else ""
            raise TypeError(f"missing {names}{hint}")
        return self.settings(**values)


def option_name(f: dataclasses.Field) -> str:
    """The command-line option of a settings field."""
    return f.metadata.get("option") or "--" + f.name.replace("_", "-")


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)`` (how ``--seeds`` is given).

    Raises:
        ValueError: not comma-separated non-negative integers.
    """
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}"
        raise ValueError(message) from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds takes comma-separated integers >= 0, got {text!r}")
    return seeds
