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


def test_store_errors_carry_their_hint_as_data():
    from ckpt_tools.store import StoreError

    exc = StoreError("no mask group 'm'", hint="run `ckpt imp` first")
    assert str(exc) == "no mask group 'm'; run `ckpt imp` first"
    again = exc.with_hint("run `ckpt imp RUN.zarr --rewind 3` first")
    assert str(again) == "no mask group 'm'; run `ckpt imp RUN.zarr --rewind 3` first"
    assert (again.problem, str(StoreError("plain"))) == ("no mask group 'm'", "plain")


def test_one_nearest_for_every_message():
    from ckpt_tools.schedule import Schedule, nearest

    steps = (0, 5, 10, 15, 19, 20, 25, 30)
    assert nearest(steps, 23) == (19, 20, 25)  # distances 4, 3, 2 beat 30's 7
    assert nearest((10, 14), 12, k=1) == (10,)  # a tie goes to the earlier step
    assert nearest((40, 45), 0) == (40, 45)  # fewer than k when fewer are stored
    schedule = Schedule.parse("0:41:5")
    assert schedule.nearest(23) == nearest(schedule.steps, 23) == (20, 25, 30)
