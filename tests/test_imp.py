import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools import StoreError, load_state_dict, open_history
from ckpt_tools.analyses.experiments import pruning as imp
from ckpt_tools.analyses.experiments.imp import ImpSettings, read_summary, run_imp
from ckpt_tools.analyses.experiments.presets import PRESETS
from ckpt_tools.analyses.experiments.pruning import (
    level_group,
    mask_to_row,
    param_table,
    prune,
    read_mask,
    train_sparse,
    write_mask,
)
from ckpt_tools.cli.app import app

SMOKE = PRESETS["smoke"].imp


pytestmark = pytest.mark.usefixtures("one_thread")


# -- prune against a slow reference --------------------------------------------------------
def reference_prune(weights, fraction, mask=None, scope="global", prunable=None, exclude=()):
    """Sort every candidate by (|w|, layer position, flat index) by hand; prune the first."""
    names = list(weights)
    mask = {n: np.ones(np.shape(w), bool) if not mask or n not in mask else np.array(mask[n])
            for n, w in weights.items()}
    out = {n: mask[n].reshape(-1).tolist() for n in names}
    cand = [n for n in names if (prunable is None or n in prunable) and n not in exclude]
    groups = [cand] if scope == "global" else [[n] for n in cand]
    for group in groups:
        entries = []
        for n in group:
            flat = np.asarray(weights[n]).reshape(-1)
            for i, alive in enumerate(out[n]):
                if alive:
                    entries.append((abs(float(flat[i])), names.index(n), i, n))
        entries.sort(key=lambda e: e[:3])
        count = math.ceil(round(fraction * len(entries), 6))
        for _, _, i, n in entries[:count]:
            out[n][i] = False
    return {n: np.array(out[n], bool).reshape(np.shape(weights[n])) for n in names}


def _weights(seed=0, ties=False):
    rng = np.random.default_rng(seed)
    w = {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)),
        "conv.bias": rng.normal(size=4),
        "fc.weight": rng.normal(size=(5, 4)) * 0.3,
    }
    if ties:  # few distinct magnitudes, so thresholds fall inside runs of equal values
        w = {k: np.round(v, 1) for k, v in w.items()}
    return w


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.93, 1.0])
def test_prune_matches_slow_reference(scope, ties, fraction):
    w = _weights(1, ties)
    prunable = ["conv.weight", "fc.weight"]
    first = prune(w, 0.3, scope=scope, prunable=prunable)
    got = prune(w, fraction, mask=first, scope=scope, prunable=prunable)
    want = reference_prune(w, fraction, first, scope, prunable)
    assert got.keys() == w.keys()
    for name in w:
        assert got[name].dtype == bool and got[name].shape == w[name].shape
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_global_and_layer_scope_differ_as_defined():
    w = _weights(2)
    w["fc.weight"] = w["fc.weight"] * 0.01  # the small layer loses everything globally first
    names = ["conv.weight", "fc.weight"]
    glob = prune(w, 0.2, prunable=names)
    layer = prune(w, 0.2, prunable=names, scope="layer")
    n_total = w["conv.weight"].size + w["fc.weight"].size
    assert sum((~glob[n]).sum() for n in names) == math.ceil(0.2 * n_total)
    assert (~glob["fc.weight"]).all()  # all 20 tiny fc weights are the smallest 20 of 128
    for n in names:
        assert (~layer[n]).sum() == math.ceil(0.2 * w[n].size)


def test_exclusions_and_non_prunable_tensors_are_kept():
    w = _weights(3)
    m = prune(w, 0.5, prunable=["conv.weight", "fc.weight"], exclude=["fc.weight"])
    assert m["fc.weight"].all() and m["conv.bias"].all()
    assert (~m["conv.weight"]).sum() == math.ceil(0.5 * w["conv.weight"].size)
    # an existing mask of an excluded tensor is kept as it is
    old = {"fc.weight": np.eye(5, 4, dtype=bool)}
    m = prune(w, 0.5, mask=old, prunable=["conv.weight", "fc.weight"], exclude=["fc.weight"])
    np.testing.assert_array_equal(m["fc.weight"], old["fc.weight"])


def test_iterative_pruning_leaves_point_eight_to_the_n():
    rng = np.random.default_rng(4)
    w = {"a": rng.normal(size=(50, 40)), "b": rng.normal(size=(1000,))}
    total, mask = 3000, None
    for level in range(1, 11):
        w = {k: v + rng.normal(size=v.shape) * 0.1 for k, v in w.items()}  # "retrained"
        mask = prune(w, 0.2, mask=mask)
        remaining = sum(int(v.sum()) for v in mask.values())
        assert abs(remaining - total * 0.8**level) <= level  # one weight of rounding per level


def test_prune_accepts_torch_and_rejects_bad_input():
    w = {"x": torch.tensor([3.0, -1.0, 2.0, -0.5])}
    np.testing.assert_array_equal(prune(w, 0.5)["x"], [True, False, True, False])
    for bad in (
        lambda: prune(w, 1.5),
        lambda: prune(w, 0.2, scope="row"),
        lambda: prune(w, 0.2, prunable=["y"]),
        lambda: prune(w, 0.2, exclude=["y"]),
        lambda: prune(w, 0.2, mask={"x": np.ones(3, bool)}),
    ):
        with pytest.raises(ValueError):
            bad()


# -- masks in the store -------------------------------------------------------------------
def test_masks_round_trip_and_refuse_other_settings(tiny_copy):
    specs = param_table(tiny_copy)
    rng = np.random.default_rng(0)
    masks = [{s.name: rng.random(s.shape) > 0.3 for s in specs if s.prunable} for _ in range(3)]
    settings = {"fraction": 0.2, "scope": "global", "exclude": []}
    for level in (0, 2, 1):
        write_mask(tiny_copy, 7, level, 3, masks[level], settings=settings)
    for level in range(3):
        got = read_mask(tiny_copy, 7, level, 3)
        assert set(got) == {s.name for s in specs}
        for s in specs:
            want = masks[level].get(s.name, np.ones(s.shape, bool))
            np.testing.assert_array_equal(got[s.name], want)
    with pytest.raises(StoreError, match="other settings"):
        write_mask(tiny_copy, 7, 3, 3, masks[0], settings={**settings, "fraction": 0.5})
    with pytest.raises(StoreError, match="stored levels: 0, 1, 2"):
        read_mask(tiny_copy, 7, 5, 3)
    ckpt_tools.open_store(tiny_copy)  # the tree still opens


# -- IMP end to end on the tiny run -------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tiny_run, tmp_path_factory):
    store = tmp_path_factory.mktemp("imp") / "tiny.zarr"
    shutil.copytree(tiny_run, store)
    result = CliRunner().invoke(app, ["imp", str(store), "--preset", "smoke", "--quiet"])
    assert result.exit_code == 0, result.output
    return store


def _lineages():
    return [(k, s) for k in SMOKE.rewind_steps for s in SMOKE.seeds]


def test_cli_summary_matches_the_stored_levels(smoke):
    summary = read_summary(smoke)
    assert summary.sizes == {"rewind_step": len(SMOKE.rewind_steps),
                             "level": SMOKE.levels + 1, "seed": len(SMOKE.seeds)}
    dense = open_history(smoke)["test_accuracy"].values[-1]
    np.testing.assert_array_equal(summary.test_accuracy.sel(level=0), dense)
    specs = param_table(smoke)
    n_prunable = sum(s.size for s in specs if s.prunable)
    for k, s in _lineages():
        for level in range(1, SMOKE.levels + 1):
            mask = read_mask(smoke, k, level, s)
            kept = sum(int(mask[p.name].sum()) for p in specs if p.prunable)
            cell = summary.sel(rewind_step=k, seed=s, level=level)
            assert float(cell.remaining) == pytest.approx(kept / n_prunable)
            assert abs(kept - n_prunable * 0.8**level) <= level
            assert float(cell.sparsity) == pytest.approx(1 - kept / n_prunable)
            acc = open_history(smoke, level_group(k, level, s))["test_accuracy"].values[-1]
            assert float(cell.test_accuracy) == acc


def test_levels_prune_the_previous_levels_final_weights(smoke):
    specs = param_table(smoke)
    prunable = [p.name for p in specs if p.prunable]
    final = ckpt_tools.open_history(smoke).step.values[-1]
    for k, s in _lineages():
        previous = load_state_dict(smoke, int(final))
        mask = None
        for level in range(1, SMOKE.levels + 1):
            weights = {p.name: previous[p.name].numpy() for p in specs}
            want = reference_prune(weights, SMOKE.fraction, mask, prunable=prunable)
            got = read_mask(smoke, k, level, s)
            for name in weights:
                np.testing.assert_array_equal(got[name], want[name])
            previous = load_state_dict(smoke, int(final), group=level_group(k, level, s))
            mask = got


def test_masked_weights_stay_exactly_zero_at_every_step(smoke):
    specs = param_table(smoke)
    for k, s in _lineages():
        for level in range(1, SMOKE.levels + 1):
            row = mask_to_row(read_mask(smoke, k, level, s), specs)
            params = open_history(smoke, level_group(k, level, s))["params"].values
            assert len(params) > 2
            assert np.all(params[:, ~row] == 0.0)
            assert np.all(params[-1, row] != 0.0)  # survivors did train


def test_levels_start_from_the_stored_weights_at_k(smoke):
    specs = param_table(smoke)
    dense = open_history(smoke)
    for k, s in _lineages():
        for level in range(1, SMOKE.levels + 1):
            row = mask_to_row(read_mask(smoke, k, level, s), specs)
            h = open_history(smoke, level_group(k, level, s))
            assert int(h.step.values[0]) == k
            np.testing.assert_array_equal(
                h.params.values[0], np.where(row, dense.params.sel(step=k).values, 0.0))
            np.testing.assert_array_equal(h.buffers.values[0], dense.buffers.sel(step=k).values)
            cfg = h.attrs["ckpt_tools"]["config"]
            assert cfg["data_seed"] == s and cfg["start_step"] == k
            # the learning rate continues the dense run's schedule from k
            np.testing.assert_array_equal(h.lr.values[1:], dense.lr.sel(step=h.step[1:]).values)


@pytest.mark.parametrize("interval", [None, 0.0], ids=["no-resume-point", "resume-point"])
def test_rerun_skips_complete_levels_and_finishes_a_half_written_one(
    smoke, monkeypatch, interval
):
    k, s, level = SMOKE.rewind_steps[-1], SMOKE.seeds[0], SMOKE.levels
    group = level_group(k, level, s)
    before = open_history(smoke, group)
    attrs = before.attrs["ckpt_tools"]["config"]["experiment"]

    class Crash(Exception):
        pass

    def crash(step, loss):
        if step == k + 3:
            raise Crash

    config = replace(imp.dense_config(smoke), data_seed=s)
    with pytest.raises(Crash):
        train_sparse(smoke, config, group=group, init=load_state_dict(smoke, k), start_step=k,
                     mask=read_mask(smoke, k, level, s), schedule=SMOKE.schedule, attrs=attrs,
                     overwrite=True, on_step=crash, resume_interval=interval)
    assert not imp.history_complete(smoke, group)
    calls = []
    original = imp.train
    monkeypatch.setattr(imp, "train", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    run_imp(smoke, SMOKE)
    assert [c["group"] for c in calls] == [group]  # only the half-written level trains
    assert calls[0]["resume"] is (interval is not None)
    after = open_history(smoke, group)
    np.testing.assert_array_equal(after["params"].values, before["params"].values)
    np.testing.assert_array_equal(after["test_accuracy"].values, before["test_accuracy"].values)


def test_rewind_step_not_stored_is_one_line_and_changes_nothing(tiny_copy):
    result = CliRunner().invoke(app, ["imp", str(tiny_copy), "--levels", "1", "--rewind", "23"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: rewind step 23 is not stored in 'train' of {tiny_copy}; nearest stored "
        "steps: 19, 20, 25"]
    assert not (tiny_copy / "experiments" / "imp").exists()


def test_cli_needs_levels_and_rewind_without_a_preset(tiny_copy):
    result = CliRunner().invoke(app, ["imp", str(tiny_copy), "--levels", "1"])
    assert result.exit_code == 2 and "missing --rewind" in result.output


def test_settings_are_validated():
    with pytest.raises(ValueError):
        ImpSettings(levels=0, rewind_steps=(0,))
    with pytest.raises(ValueError):
        ImpSettings(levels=1, rewind_steps=(0,), fraction=1.0)


def _chart_values(spec: dict) -> list[dict]:
    """Every inline data row in a Vega-Lite spec (layers included)."""
    found = []
    if isinstance(spec, dict):
        for rows in (spec.get("datasets") or {}).values():
            found.extend(rows)
        data = spec.get("data")
        if isinstance(data, dict) and "values" in data:
            found.extend(data["values"])
        for value in spec.values():
            found.extend(_chart_values(value))
    elif isinstance(spec, list):
        for value in spec:
            found.extend(_chart_values(value))
    return found


def test_report_draws_accuracy_vs_remaining_with_seed_means(smoke):
    from ckpt_tools.analyses.report import build_report, load_runs

    report = build_report(load_runs([smoke]))
    sections = {section.title: figures for section, figures in report.sections}
    spec = sections["IMP with rewinding"]["imp"].to_dict()
    rows = [r for r in _chart_values(spec) if "rewind_step" in r]
    summary = read_summary(smoke)
    assert len(rows) == summary.sizes["rewind_step"] * summary.sizes["level"]
    for row in rows:
        cell = summary.sel(rewind_step=row["rewind_step"], level=row["level"])
        assert row["mean"] == pytest.approx(float(cell.test_accuracy.mean()))
        assert row["remaining"] == pytest.approx(float(cell.remaining.mean()))
        assert row["low"] <= row["mean"] <= row["high"]
    dense = [r["dense"] for r in _chart_values(spec) if "dense" in r]
    assert dense == [pytest.approx(summary.attrs["dense_test_accuracy"])]


def test_cli_layer_scope_and_output_exclusion(tiny_copy):
    args = ["imp", str(tiny_copy), "--levels", "1", "--rewind", "5", "--scope", "layer",
            "--exclude-output", "--fraction", "0.5", "--schedule", "0:41:20", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    mask = read_mask(tiny_copy, 5, 1, 0)
    for spec in param_table(tiny_copy):
        kept = int(mask[spec.name].sum())
        if spec.name == "fc.weight" or not spec.prunable:
            assert kept == spec.size, spec.name
        else:
            assert spec.size - kept == math.ceil(0.5 * spec.size), spec.name
    summary = read_summary(tiny_copy)
    prunable = [s for s in param_table(tiny_copy) if s.prunable]
    kept = sum(int(mask[s.name].sum()) for s in prunable)
    assert float(summary.remaining.sel(rewind_step=5, level=1, seed=0)) == pytest.approx(
        kept / sum(s.size for s in prunable))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_fit_the_runs_they_are_sized_for(name, tiny_run):
    preset = PRESETS[name]
    stored = preset.record.checkpoint_schedule()
    for k in (*preset.imp.rewind_steps, *preset.instability.rewind_steps):
        assert k in stored and k < preset.record.steps
    if name == "smoke":
        assert imp.dense_config(tiny_run) == preset.record  # the tests' tiny run


def test_an_unfinished_dense_run_is_trained_to_the_end_first(tmp_path):
    from ckpt_tools.train import train

    store = tmp_path / "cut.zarr"

    class Cut(Exception):
        pass

    def cut(step, loss):
        if step == 30:
            raise Cut

    with pytest.raises(Cut):
        train(PRESETS["smoke"].record, store, on_step=cut, resume_interval=None)
    assert not imp.history_complete(store, "train")
    summary = run_imp(store, ImpSettings(levels=1, rewind_steps=(5,), schedule="0:41:20"))
    assert summary.attrs["dense_group"] == imp.DENSE_GROUP
    dense = open_history(store, imp.DENSE_GROUP)
    train_rows = open_history(store)
    last = int(train_rows.step[-1])
    assert int(dense.step[0]) == last and int(dense.step[-1]) == 40
    np.testing.assert_array_equal(dense.params.values[0], train_rows.params.sel(step=last).values)
    assert summary.attrs["dense_test_accuracy"] == dense.test_accuracy.values[-1]
    assert int(train_rows.step[-1]) == last  # the recorded run is left as it was
    # level 1 pruned the continued dense network's final weights
    final = load_state_dict(store, 40, group=imp.DENSE_GROUP)
    specs = param_table(store)
    want = reference_prune({s.name: final[s.name].numpy() for s in specs}, 0.2,
                           prunable=[s.name for s in specs if s.prunable])
    got = read_mask(store, 5, 1, 0)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


# -- the output layer and the reported sparsity ---------------------------------------------
def _prunable_slices(config) -> list[slice]:
    """Where the conv and linear weights sit in the flat param row, from the model itself."""
    model = ckpt_tools.models.build(config.model, num_classes=10, in_channels=1, image_size=8,
                                    width=config.width)
    weights = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, torch.nn.Conv2d | torch.nn.Linear)}
    out, offset = [], 0
    for name, p in model.named_parameters():
        if name in weights:
            out.append(slice(offset, offset + p.numel()))
        offset += p.numel()
    return out


def test_reported_sparsity_is_the_count_on_the_stored_masks(tiny_copy):
    import xarray as xr

    summary = run_imp(tiny_copy, ImpSettings(levels=2, rewind_steps=(0,), seeds=(0,),
                                             fraction=0.75, schedule="0:41:40"))
    masks = xr.open_zarr(tiny_copy, group="experiments/imp/rewind_0/seed_0/masks",
                         consolidated=False)["mask"].values  # (level, param), read directly
    where = _prunable_slices(imp.dense_config(tiny_copy))
    total = sum(s.stop - s.start for s in where)
    alive = total  # the convnet prunes its output layer: every prunable weight is a candidate
    for level in (1, 2):
        alive -= math.ceil(0.75 * alive)
        kept = sum(int(masks[level, s].sum()) for s in where)
        assert kept == alive
        assert float(summary.remaining.sel(rewind_step=0, level=level, seed=0)) == kept / total
    # two levels of 75%: 6.25% of the weights, to the rounding of two ceil()s
    assert abs(kept / total - 0.0625) < 2 / total


@pytest.mark.parametrize(("model", "excluded"), [("resnet20", False), ("convnet", False),
                                                 ("vgg16", True), ("lenet300", True)])
def test_output_layer_default_follows_open_lth_per_family(model, excluded):
    assert imp.output_excluded(model) is excluded


def test_lenet_leaves_its_output_layer_and_the_flags_override(tmp_path):
    store = tmp_path / "lenet.zarr"
    config = ckpt_tools.train.TrainConfig(model="lenet300", dataset="digits", width=16, steps=6,
                                          batch_size=32, schedule="0:7:3", eval_schedule="6")
    ckpt_tools.train.train(config, store)
    settings = ImpSettings(levels=1, rewind_steps=(0,), seeds=(0,), fraction=0.5,
                           schedule="0:7:6")
    run_imp(store, settings)
    mask = read_mask(store, 0, 1, 0)
    assert mask["fc.weight"].all()  # the family default: open_lth's LeNet ignores fc.weight
    assert not all(mask[s.name].all() for s in param_table(store) if s.prunable)
    # the same lineage with the output layer pruned is refused, naming the flag
    with pytest.raises(StoreError, match="--include-output"):
        run_imp(store, replace(settings, exclude_output=False))
    run_imp(store, replace(settings, exclude_output=False, rewind_steps=(3,)))
    assert not read_mask(store, 3, 1, 0)["fc.weight"].all()
