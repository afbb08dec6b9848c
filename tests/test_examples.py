"""Every script in examples/ runs to completion (each takes an output folder argument)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted(p for p in (Path(__file__).parents[1] / "examples").glob("[0-9]*.py")
                  if p.name != "03_reproduce_early_phase.py")  # test_study.py runs it


def test_examples_are_found():
    assert EXAMPLES, "no examples/NN_*.py scripts"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, f"{script.name} failed:\n{run.stdout}\n{run.stderr}"
