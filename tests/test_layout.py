"""The package layout: public import paths survive moves, and every package ships."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_public_paths_are_the_moved_objects():
    from ckpt_tools.analyses import accessor, imp, perturb, stats, telemetry
    from ckpt_tools.analyses.experiments import perturb as moved_perturb
    from ckpt_tools.analyses.experiments import pruning

    assert imp.prune is pruning.prune and imp.read_mask is pruning.read_mask
    assert perturb.permute is moved_perturb.permute
    assert perturb.ABLATIONS is moved_perturb.ABLATIONS
    assert callable(telemetry.compute) and callable(stats.summarize)
    assert accessor.__name__ == "ckpt_tools.analyses.accessor"


def test_every_source_package_is_listed_for_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {dotted: ROOT / folder for dotted, folder in config["package-dir"].items()}
    found = set()
    for dotted, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((dotted, *rel)))
    assert found == listed
