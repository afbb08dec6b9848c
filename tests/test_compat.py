"""Stores of the older group layout (experiment groups at the top level) still read.

`data/legacy_layout.tar.gz` was written by an earlier version (see `data/README.md`):
its IMP and instability groups sit at ``imp/...`` and ``instability/...``, with the
summaries that version stored. Today's code finds them through the compatibility map.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from ckpt_tools import open_history
from ckpt_tools.analyses.experiments import compat
from ckpt_tools.analyses.experiments.imp import ImpSettings, imp_summary, run_imp
from ckpt_tools.analyses.experiments.instability import (
    PREFIX,
    InstabilitySettings,
    copy_group,
    run_instability,
)
from ckpt_tools.analyses.experiments.pruning import level_group, mask_group, read_mask
from ckpt_tools.analyses.report import gather_experiments
from ckpt_tools.store import masks as mask_store
from ckpt_tools.store import read_result

ARCHIVE = Path(__file__).parent / "data" / "legacy_layout.tar.gz"


@pytest.fixture
def legacy(tmp_path) -> Path:
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "legacy.zarr"


def test_the_map_names_both_layouts():
    new = "experiments/imp/rewind_3/seed_0/level_1"
    assert compat.legacy_name(new) == "imp/rewind_3/seed_0/level_1"
    assert compat.current_name("imp/rewind_3/seed_0/level_1") == new
    assert compat.legacy_name("experiments/ablate/x") is None  # never moved
    assert compat.current_name("train") == "train"


def test_groups_are_found_where_the_store_holds_them(legacy, tiny_run):
    assert level_group(3, 1, 0, store=legacy) == "imp/rewind_3/seed_0/level_1"
    assert mask_group(3, 0, store=legacy) == "imp/rewind_3/seed_0/masks"
    assert copy_group(PREFIX, 3, 1, store=legacy) == "instability/rewind_3/seed_1"
    assert level_group(3, 1, 0, store=tiny_run) == "experiments/imp/rewind_3/seed_0/level_1"
    assert level_group(3, 2, 0, store=legacy) == "experiments/imp/rewind_3/seed_0/level_2"


def test_masks_and_histories_read_from_the_older_paths(legacy):
    mask = read_mask(legacy, 3, 1, 0)
    row, specs = mask_store.read_mask_row(legacy, "imp/rewind_3/seed_0/masks", 1)
    for s in specs:
        np.testing.assert_array_equal(mask[s.name].reshape(-1), row[s.offset : s.stop] > 0.5)
    assert 0.0 < np.mean(np.concatenate([m.reshape(-1) for m in mask.values()])) < 1.0
    history = open_history(legacy, level_group(3, 1, 0, store=legacy))
    assert int(history.step[-1]) == 6


def test_summaries_gathered_today_equal_the_ones_stored_then(legacy):
    stored = read_result(legacy, "imp_summary")
    today = imp_summary(legacy)
    for var in ("remaining", "test_accuracy", "test_loss"):
        np.testing.assert_array_equal(today[var].values, stored[var].values)
    assert today.attrs["dense_test_accuracy"] == stored.attrs["dense_test_accuracy"]
    reduced = gather_experiments(legacy)
    np.testing.assert_allclose(reduced.imp.test_accuracy.sel(statistic="mean"),
                               stored.test_accuracy.mean("seed"), rtol=1e-12)
    assert set(reduced.instability) == {None}


@pytest.mark.usefixtures("one_thread")
def test_experiments_continue_on_an_older_store_without_training_again(legacy):
    stored = read_result(legacy, "instability_summary")
    trained = []
    run_imp(legacy, ImpSettings(levels=1, rewind_steps=(3,), seeds=(0,), schedule="0:7:6"),
            on_level=lambda k, s, n: trained.append(("imp", k, s, n)))
    result = run_instability(
        legacy, InstabilitySettings(rewind_steps=(3,), seeds=(1, 2), points=3, bn_batches=1,
                                    schedule="0:7:6"),
        on_copy=lambda k, s: trained.append(("copy", k, s)))
    assert trained == []  # every group was found complete at its older path
    np.testing.assert_array_equal(result["barrier"].values, stored["barrier"].values)
    assert not (legacy / "experiments").exists()
