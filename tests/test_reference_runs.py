"""Runs recorded before a change of the training code give the same bytes after it.

`data/reference_runs.json` holds digests of every history group that one fixed sequence
of commands recorded with an earlier version (see `data/README.md`); the same sequence
must record the same float32 bytes today, so refactors of `train()` and the experiments
cannot change results silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ckpt_tools import open_history
from ckpt_tools.analyses.experiments import compat
from ckpt_tools.cli.app import app
from ckpt_tools.store import store_info

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_runs.json").read_text())

COMMANDS = [
    ["record", "--model", "convnet", "--width", "2", "--dataset", "digits", "--steps", "12",
     "--batch-size", "16", "--seed", "0", "--schedule", "0:13:2", "--eval-schedule", "0:13:6"],
    ["imp", "--levels", "1", "--rewind", "2", "--seeds", "0", "--schedule", "0:13:5", "--quiet"],
    ["ablate", "--rewind", "2", "--kind", "signs_k_mags_init", "--schedule", "0:13:5",
     "--quiet"],
    # --real-task full: the only mode when the reference was recorded (the default is now
    # from-n, which trains other updates)
    ["pretrain", "--task", "rotation", "--steps", "4", "--levels", "1", "--seeds", "0",
     "--real-task", "full", "--schedule", "0:13:5", "--quiet"],
    ["instability", "--rewind", "2", "--seeds", "1,2", "--points", "3", "--bn-batches", "1",
     "--schedule", "0:13:5", "--quiet"],
]


def digests(store: Path, group: str) -> dict[str, str]:
    history = open_history(store, group)
    out = {}
    for name in ("params", "buffers", "loss", "step"):
        if name in history:
            raw = np.ascontiguousarray(history[name].values).tobytes()
            out[name] = hashlib.sha256(raw).hexdigest()[:16]
    return out


def legacy_name(group: str) -> str:
    """The path the reference gives `group`: its path in the layout it was recorded in."""
    return compat.legacy_name(group) or group


@pytest.mark.usefixtures("one_thread")
def test_the_reference_commands_record_the_same_bytes(tmp_path):
    store = tmp_path / "ref.zarr"
    runner = CliRunner()
    for command in COMMANDS:
        args = [*command, "--out", str(store)] if command[0] == "record" else [
            command[0], str(store), *command[1:]]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    groups = [g["group"] for g in store_info(store)["groups"]]
    got = {legacy_name(g): digests(store, g) for g in groups}
    assert sorted(got) == sorted(REFERENCE)
    for group, expected in REFERENCE.items():
        assert got[group] == expected, group
