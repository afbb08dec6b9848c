"""Every command's help renders, and renders its text literally (no markup, no emoji)."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from ckpt_tools.cli.app import app

COMMAND = typer.main.get_command(app)
NAMES = sorted(COMMAND.commands)


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_the_commands_are_all_there():
    assert {"record", "info", "analyze", "report", "imp", "instability", "ablate",
            "pretrain"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_every_text_as_written(name):
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    shown = _squeeze(result.output)
    command = COMMAND.commands[name]
    texts = [command.help or ""] + [p.help for p in command.params if getattr(p, "help", None)]
    for text in texts:
        first_paragraph = text.split("\n\n")[0]
        assert _squeeze(first_paragraph) in shown, f"{name}: {first_paragraph!r} not shown"
    assert not re.search("[\U0001F300-\U0001FAFF\u2600-\u27BF]", result.output)


def test_the_schedule_example_is_not_an_emoji():
    result = CliRunner().invoke(app, ["record", "--help"])
    assert "0:100:1" in result.output and "\U0001F4AF" not in result.output
