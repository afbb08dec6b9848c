"""Architecture rules that keep the code base readable: who may import what."""

from __future__ import annotations

import re
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
