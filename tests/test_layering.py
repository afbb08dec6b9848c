"""Architecture rules that keep the code base readable: who may import what."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZARR = re.compile(r"^\s*(import zarr|from zarr)\b", re.M)
UPWARD = re.compile(r"^\s*(from|import) ckpt_tools\.(analyses|cli)\b", re.M)


def _sources(*folders):
    for folder in folders:
        yield from (ROOT / folder).rglob("*.py")


def test_only_the_store_package_imports_zarr():
    offenders = [str(p.relative_to(ROOT)) for p in _sources("ckpt_tools", "analyses", "cli")
                 if ZARR.search(p.read_text()) and "ckpt_tools/store/" not in p.as_posix()]
    assert offenders == []


def test_the_core_never_imports_analyses_or_the_cli():
    offenders = [str(p.relative_to(ROOT)) for p in _sources("ckpt_tools")
                 if UPWARD.search(p.read_text())]
    assert offenders == []


FRAMEWORK = re.compile(
    r"^\s*(import|from) (lightning|pytorch_lightning|transformers|accelerate)\b", re.M
)


def test_only_the_integrations_import_training_frameworks():
    offenders = [str(p.relative_to(ROOT)) for p in _sources("ckpt_tools", "analyses", "cli")
                 if FRAMEWORK.search(p.read_text())
                 and "ckpt_tools/integrations/" not in p.as_posix()]
    assert offenders == []


def test_importing_the_toolkit_loads_no_training_framework():
    code = ("import sys, ckpt_tools, ckpt_tools.analyses, ckpt_tools.cli.app, "
            "ckpt_tools.integrations; print(sorted({m.split('.')[0] for m in sys.modules}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    loaded = set(ast.literal_eval(run.stdout.strip().splitlines()[-1]))
    assert loaded & {"lightning", "pytorch_lightning", "transformers", "accelerate"} == set()
    assert "ckpt_tools" in loaded  # the check would see them if they were there


def test_the_hub_libraries_load_only_when_used():
    code = ("import sys, ckpt_tools, ckpt_tools.importer, ckpt_tools.exporter, ckpt_tools.cli.app; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    loaded = set(ast.literal_eval(run.stdout.strip().splitlines()[-1]))
    assert loaded & {"safetensors", "huggingface_hub"} == set()
    assert "ckpt_tools" in loaded
