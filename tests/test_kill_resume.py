"""SIGKILL at random moments: the store always opens, nothing shown is ever lost or
altered, and the resumed history equals the uninterrupted one bitwise (bench scripts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script, *args, timeout=600):
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_killed_record_runs_lose_nothing_and_resume_bitwise(tmp_path):
    code, out = _run("kill_resume.py", "--trials", "2", "--steps", "24", "--width", "4",
                     "--schedule", "0:25:1", "--eval-schedule", "0:25:12", "--interval", "0.1",
                     "--sigint-every", "2", "--workdir", str(tmp_path))
    assert code == 0, out[-3000:]
    assert "trials (kills): 2  (SIGKILL 1, SIGINT 1, SIGINT exits clean 1/1" in out
    assert "steps lost: 0  steps altered: 0  evaluations altered: 0  failed opens: 0" in out
    assert "bitwise identical to the reference: True" in out  # each completed run
    assert "bitwise identical to the reference: False" not in out


@pytest.mark.slow
def test_killed_imp_continues_level_by_level(tmp_path):
    code, out = _run("kill_imp.py", "--trials", "1", "--steps", "20", "--levels", "1",
                     "--workdir", str(tmp_path))
    assert code == 0, out[-3000:]
    assert "kills: 1;" in out and "lost or altered: 0" in out
    assert "identical to the reference: False" not in out
