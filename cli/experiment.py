"""``ckpt <experiment>``: one command per registered experiment, generated from its settings.

Each settings field becomes an option with the field's help text: booleans a flag pair,
``Literal`` fields a choice, tuples a repeatable option, fields with a ``parse`` function
text. ``--preset`` offers the experiment's presets, ``--quiet`` silences progress, and
the store is a path or a URL (with ``--storage-options``).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import types
import typing
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ckpt_tools.analyses.experiments import registry
from ckpt_tools.analyses.experiments.contract import Experiment, option_name
from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.location import StorageOptions, store_location

__all__ = ["add_commands", "command"]


def _option_type(f: dataclasses.Field, hints: dict[str, Any]) -> tuple[Any, Any]:
    """(the option's type, how to turn its value into the field's)."""
    parse, choices = f.metadata.get("parse"), f.metadata.get("choices")
    if parse is not None:
        return str, parse
    hint = hints[f.name]
    if choices:
        choice = enum.Enum(f"{f.name}_choice", {c: c for c in choices}, type=str)
        if typing.get_origin(hint) is tuple:
            return list[choice], lambda v: tuple(c.value for c in v)
        return choice, lambda v: v.value
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0] if len(args) == 1 else hint
    if typing.get_origin(hint) is typing.Literal:
        choice = enum.Enum(f"{f.name}_choice", {str(v): str(v) for v in typing.get_args(hint)},
                           type=str)
        return choice, lambda v: v.value
    if typing.get_origin(hint) is tuple:
        (item, *_) = typing.get_args(hint)
        return list[item], tuple
    return hint, lambda v: v


def command(exp: Experiment):
    """The typer command of `exp`: parse the options, build the settings, run, print."""
    hints = typing.get_type_hints(exp.settings)
    params = [inspect.Parameter(
        "store", inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[str, typer.Argument(
            help="A store recorded by `ckpt record` (RUN.zarr); a path or a URL.")])]
    convert = {}
    for f in dataclasses.fields(exp.settings):
        kind, convert[f.name] = _option_type(f, hints)
        names = f.metadata.get("flag") if kind is bool else None
        option = typer.Option(names or option_name(f), help=f.metadata.get("help", ""))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    names = list(exp.preset_values())
    if names:
        presets = enum.Enum(f"{exp.name}_preset", {p: p for p in names}, type=str)
        params.append(inspect.Parameter(
            "preset", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[presets | None, typer.Option(
                help="Sizes: " + ", ".join(names) + "; options override them.")]))
    params.append(inspect.Parameter(
        "quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=Annotated[bool, typer.Option(help="No progress output.")]))
    params.append(inspect.Parameter(
        "storage_options", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=StorageOptions))

    def run(store: str, **options) -> None:
        quiet, preset = options.pop("quiet"), options.pop("preset", None)
        store = store_location(store, options.pop("storage_options"))
        given = {k: convert[k](v) for k, v in options.items() if v is not None}
        try:
            settings = exp.make_settings(preset.value if preset else None, **given)
        except TypeError as exc:
            raise fail(str(exc), USAGE) from None
        console = Console(stderr=True, quiet=quiet)
        summary = exp.run(store, settings, console.print)
        note = f"summary stored in analyses/{exp.summary_name}"
        if exp.describe is not None:
            described = exp.describe(summary, settings)
            table = Table(title=described.title)
            for column in described.columns:
                table.add_column(column, justify="right")
            for row in described.rows:
                table.add_row(*row)
            Console().print(table)
            note = described.note or note
        typer.echo(note)

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = exp.help
    run.__name__ = exp.name.replace("-", "_")
    return friendly(run)


def add_commands(app: typer.Typer) -> None:
    """Register one command per registered experiment on `app`."""
    for name in registry.names():
        app.command(name)(command(registry.get(name)))
