"""Pretext tasks checked against hand computations, and `ckpt pretrain` end to end."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_reference import reference_eval
from typer.testing import CliRunner

from ckpt_tools import batches, load_state_dict, open_history
from ckpt_tools.analyses.experiments import pretext
from ckpt_tools.analyses.experiments.pretrain import (
    PretrainSettings,
    pretrain_config,
    read_pretrain_summary,
    run_pretrain,
)
from ckpt_tools.analyses.experiments.pruning import (
    dense_config,
    final_eval,
    param_table,
    prune,
    write_mask,
)
from ckpt_tools.analyses.report import gather_experiments, sections
from ckpt_tools.cli.app import app
from ckpt_tools.data import ImageData
from ckpt_tools.store import masks as mask_store
from ckpt_tools.train import Task, TrainConfig, lr_at, train


def drawn_rows(spec) -> list[dict]:
    """Every distinct data row with a ``mean`` anywhere in a Vega-Lite spec."""
    found = []
    if isinstance(spec, dict):
        if "mean" in spec:
            return [spec]
        found = [r for value in spec.values() for r in drawn_rows(value)]
    elif isinstance(spec, list):
        found = [r for value in spec for r in drawn_rows(value)]
    return [r for i, r in enumerate(found) if r not in found[:i]]


def read_mask_from(store, group: str, level: int) -> dict[str, np.ndarray]:
    row, specs = mask_store.read_mask_row(store, group, level)
    return {s.name: row[s.offset : s.stop].reshape(s.shape) for s in specs if s.prunable}


def _indexed_data(n: int = 40, classes: int = 10) -> ImageData:
    """Training image i is the constant image i, so a batch tells which examples it holds."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    y = torch.arange(n, dtype=torch.int64) % classes
    return ImageData("indexed", x, y, x[:8], y[:8], classes, 1, 4, (0.0,), (1.0 / 255,), False)


def test_rotation_images_are_exact_rot90_and_labels_the_turns():
    x = torch.randn(64, 3, 5, 5)
    out, r = pretext.rotate(x, seed=1, step=3)
    assert r.dtype == torch.int64 and set(r.tolist()) == {0, 1, 2, 3}
    for i in range(len(x)):
        turned = x[i]
        for _ in range(int(r[i])):  # a quarter turn counter-clockwise, by hand
            turned = turned.transpose(-2, -1).flip(-2)
        assert torch.equal(out[i], turned)
    again, r2 = pretext.rotate(x, seed=1, step=3)
    assert torch.equal(again, out) and torch.equal(r2, r)
    assert not torch.equal(pretext.rotate(x, seed=1, step=4)[1], r)


def test_rotation_labels_are_uniform():
    _, r = pretext.rotate(torch.zeros(8000, 1, 2, 2), seed=0, step=1)
    np.testing.assert_allclose(np.bincount(r.numpy(), minlength=4) / 8000, 0.25, atol=0.02)


def test_blur_is_the_block_mean_by_hand():
    x = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)
    g = x[0, 0].numpy()
    by_hand = np.empty((5, 5), dtype=np.float32)
    for i in range(5):
        for j in range(5):
            bi, bj = (i // 2) * 2, (j // 2) * 2
            by_hand[i, j] = g[bi : bi + 2, bj : bj + 2].mean()  # edge blocks are cut
    np.testing.assert_allclose(pretext.blur(x, 2)[0, 0].numpy(), by_hand, rtol=1e-6)
    assert by_hand[4, 4] == 24 and by_hand[0, 4] == 6.5
    assert torch.equal(pretext.blur(x, 1), x)
    flat = pretext.blur(x, 5)
    assert torch.allclose(flat, torch.full_like(x, 12.0))


def test_blur_commutes_with_normalisation():
    data = _indexed_data()
    raw = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    blurred_then_normalised = (pretext.blur(raw.float(), 2) / 255 - 0.0) * 255
    normalised = batches.normalize(data, raw)
    torch.testing.assert_close(pretext.blur(normalised, 2), blurred_then_normalised)


def test_random_labels_fixed_per_example_across_epochs():
    data = _indexed_data()
    task = pretext.task("random-labels", seed=3)
    shuffled = task.prepare(data)
    assert torch.equal(task.prepare(data).y_train, shuffled.y_train)
    assert torch.equal(shuffled.x_train, data.x_train) and torch.equal(shuffled.y_test, data.y_test)
    assert (shuffled.y_train != data.y_train).float().mean() > 0.5
    seen: dict[int, set[int]] = {}
    per_epoch = batches.batches_per_epoch(shuffled, 8)
    for step in range(1, 3 * per_epoch + 1):  # three epochs, each in its own order
        x, y = batches.batch_for_step(shuffled, step, batch_size=8, seed=0)
        for image, label in zip(x[:, 0, 0, 0].round().long().tolist(), y.tolist(), strict=True):
            seen.setdefault(image, set()).add(label)
    assert len(seen) == 40 and all(len(labels) == 1 for labels in seen.values())
    labels = {i: found.pop() for i, found in seen.items()}
    assert labels == dict(enumerate(shuffled.y_train.tolist()))


def test_subset_is_a_fixed_fraction():
    data = _indexed_data()
    a = pretext.task("subset", seed=2, subset_fraction=0.25).prepare(data)
    b = pretext.task("subset", seed=2, subset_fraction=0.25).prepare(data)
    assert len(a.y_train) == 10 and torch.equal(a.x_train, b.x_train)
    ids = a.x_train[:, 0, 0, 0].long()
    assert len(set(ids.tolist())) == 10
    assert torch.equal(a.y_train, data.y_train[ids])
    assert torch.equal(a.x_test, data.x_test)


def test_rotation_task_has_a_four_way_head_and_rotates_evaluation_too():
    data = _indexed_data()
    task = pretext.task("blur-rotation", seed=0, blur_factor=2)
    assert task.prepare(data).num_classes == 4
    x = torch.randn(16, 1, 4, 4)
    out, r = task.transform(x, torch.zeros(16, dtype=torch.long), 0)
    blurred = pretext.blur(x, 2)
    for i in range(16):
        assert torch.equal(out[i], torch.rot90(blurred[i], int(r[i]), dims=(-2, -1)))


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("jigsaw", {}, "unknown pretext task"),
        ("subset", {"subset_fraction": 0.0}, "fraction"),
        ("blur", {"blur_factor": 0}, "blur factor"),
    ],
)
def test_bad_task_parameters_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pretext.task(name, seed=0, **kwargs)


def test_imagedata_replace_keeps_validation():
    data = _indexed_data()
    with pytest.raises(ValueError):
        dataclasses.replace(data, y_train=data.y_train[:3])


def test_train_applies_the_task_to_training_and_evaluation_batches(tmp_path):
    seen = []

    def spy(x, y, step):
        seen.append(step)
        return x, y

    config = TrainConfig(model="convnet", dataset="digits", width=4, steps=3, batch_size=32,
                         schedule="0:4:1", eval_schedule="0:4:3")
    train(config, tmp_path / "spy.zarr", task=Task(transform=spy))
    # evaluations at steps 0 and 3 see the test split (360 images) in batches, as step 0
    evals = [0] * -(-360 // config.eval_batch_size)
    assert seen == [*evals, 1, 2, 3, *evals]


@pytest.mark.parametrize("total", [40, 41, 97, 1000])
@pytest.mark.parametrize("steps", [1, 5, 20, 30, 39])
def test_pretrain_config_keeps_the_learning_rate_of_each_update(total, steps):
    config = TrainConfig(steps=total, lr_milestones=(0.5, 0.75), warmup_steps=3)
    cut = pretrain_config(config, steps)
    assert cut.steps == steps
    assert [lr_at(cut, s) for s in range(1, steps + 1)] == [
        lr_at(config, s) for s in range(1, steps + 1)
    ]


# -- `ckpt pretrain` end to end on the shared tiny run ---------------------------------------
N = 5  # pre-training updates (the smoke preset)


def _group(task: str, part: str, mode: str = "from-n") -> str:
    where = "from_n/" if part != "pretrain" and mode == "from-n" else ""
    return f"experiments/pretrain/{task}/steps_{N}/seed_0/{where}{part}"


def test_pretrain_rotation_cli_then_imp_from_the_pretrained_weights(tiny_copy):
    result = CliRunner().invoke(app, ["pretrain", str(tiny_copy), "--task", "rotation",
                                      "--preset", "smoke", "--quiet"])
    assert result.exit_code == 0, result.output
    config = dense_config(tiny_copy)
    pre = open_history(tiny_copy, _group("rotation", "pretrain"))
    assert pre.step.values.tolist() == [0, N]
    head = [s for s in param_table(tiny_copy, _group("rotation", "pretrain"))
            if s.name == "fc.weight"]
    assert head[0].shape[0] == 4  # a 4-way rotation head
    step_0 = load_state_dict(tiny_copy, 0)
    pretrained = load_state_dict(tiny_copy, N, group=_group("rotation", "pretrain"))
    # the real task starts at step N (the default, as open_lth)
    start = load_state_dict(tiny_copy, N, group=_group("rotation", "level_0"))
    for name, value in start.items():
        expected = step_0[name] if name.startswith("fc.") else pretrained[name]
        assert torch.equal(value, expected), name  # real head: the run's own at step 0
    assert not torch.equal(start["features.0.weight"], step_0["features.0.weight"])
    # level 1 rewinds to the pre-trained weights under its mask
    mask = read_mask_from(tiny_copy, _group("rotation", "masks"), 1)
    level_1 = load_state_dict(tiny_copy, N, group=_group("rotation", "level_1"))
    for name in mask:
        np.testing.assert_array_equal(
            level_1[name].numpy(), np.where(mask[name], start[name].numpy(), 0)
        )
    summary = read_pretrain_summary(tiny_copy)
    cell = summary.sel(task="rotation", pretrain_steps=N, seed=0)
    assert np.all(np.isfinite(cell.test_accuracy.values))
    assert np.isfinite(float(cell.pretext_accuracy))
    np.testing.assert_allclose(cell.remaining.values, [1.0, 0.8], atol=1e-3)
    assert cell.test_accuracy.sel(level=0) == final_eval(tiny_copy, _group("rotation", "level_0"))[
        "test_accuracy"]
    assert config.steps in open_history(tiny_copy, _group("rotation", "level_1")).step.values
    run = SimpleNamespace(name="t", experiments=gather_experiments(tiny_copy))
    figures = sections.pretraining_section([run])
    drawn = drawn_rows(figures["pretraining"].to_dict())
    assert {(r["level"], r["mean"]) for r in drawn} == {
        (level, float(cell.test_accuracy.sel(level=level))) for level in (0, 1)}


def test_sparse_pretraining_keeps_the_mask(tiny_copy):
    # The IMP mask of level 1 (rewind 0, seed 0), pruned here rather than by `ckpt imp`.
    specs = param_table(tiny_copy)
    prunable = [s.name for s in specs if s.prunable]
    final = load_state_dict(tiny_copy, 40)
    mask = prune({n: final[n] for n in prunable}, 0.2)
    write_mask(tiny_copy, 0, 1, 0, mask, settings={"fraction": 0.2})
    result = CliRunner().invoke(app, ["pretrain", str(tiny_copy), "--task", "sparse",
                                      "--preset", "smoke", "--quiet"])
    assert result.exit_code == 0, result.output
    label = "sparse_rewind_0_level_1"
    pre = open_history(tiny_copy, _group(label, "pretrain"))
    params = pre.params.values  # (step, param)
    for spec in specs:
        if spec.prunable:
            pruned = ~mask[spec.name].reshape(-1)
            assert np.all(params[:, spec.offset : spec.stop][:, pruned] == 0)
    pretrained = load_state_dict(tiny_copy, N, group=_group(label, "pretrain"))
    start = load_state_dict(tiny_copy, N, group=_group(label, "level_1"))
    assert all(torch.equal(start[n], pretrained[n]) for n in start)
    assert open_history(tiny_copy, _group(label, "level_1")).step.values[0] == N
    summary = read_pretrain_summary(tiny_copy)
    last = int(open_history(tiny_copy, _group(label, "level_1")).step[-1])
    _, accuracy = reference_eval(tiny_copy, last, _group(label, "level_1"))
    assert float(summary.test_accuracy.sel(task=label, pretrain_steps=N, level=1, seed=0)) == \
        pytest.approx(accuracy, abs=1e-12)


def test_pretrain_errors_are_one_line(tiny_copy):
    result = CliRunner().invoke(app, ["pretrain", str(tiny_copy), "--task", "sparse",
                                      "--steps", "3"])
    assert result.exit_code == 1 and "ckpt imp" in result.output
    result = CliRunner().invoke(app, ["pretrain", str(tiny_copy), "--task", "blur"])
    assert result.exit_code == 2 and "--steps" in result.output
    result = CliRunner().invoke(app, ["pretrain", str(tiny_copy), "--task", "subset",
                                      "--steps", "3", "--subset-fraction", "1.5"])
    assert result.exit_code == 2 and "fraction" in result.output
    result = CliRunner().invoke(app, ["pretrain", str(tiny_copy), "--task", "blur",
                                      "--steps", "40"])  # from-n needs N < T = 40
    assert result.exit_code == 2 and "--real-task full" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "experiments" not in {p.name for p in tiny_copy.iterdir()}


@pytest.mark.usefixtures("one_thread")
def test_real_task_updates_in_each_mode(tiny_copy):
    """from-n trains updates N+1..T after pre-training, full all T; counted as they run."""
    config = dense_config(tiny_copy)
    steps: dict[str, list[int]] = {}
    current: list[str] = []

    def on_run(group, seed):
        current.append(group)
        steps.setdefault(group, [])

    for mode, first in (("from-n", N), ("full", 0)):
        settings = PretrainSettings(task="blur", steps=N, levels=1, seeds=(0,),
                                    schedule="0:41:10", real_task=mode)
        summary = run_pretrain(tiny_copy, settings, on_run=on_run,
                               on_step=lambda step, loss: steps[current[-1]].append(step))
        label = "blur_x4" if mode == "from-n" else "blur_x4_full"
        assert str(summary.real_task.sel(task=label).item()) == mode
        for level in (0, 1):
            group = _group("blur_x4", f"level_{level}", mode)
            # the updates the loop applied, one by one
            assert steps[group] == list(range(first + 1, config.steps + 1))
            recorded = open_history(tiny_copy, group).step.values
            assert recorded[0] == first and recorded[-1] == config.steps
            updates = summary.real_task_updates.sel(task=label, pretrain_steps=N, seed=0,
                                                    level=level)
            assert int(updates) == len(steps[group]) == config.steps - first
    # the pre-training run is shared: trained once (by the first mode), N updates
    assert steps[_group("blur_x4", "pretrain")] == list(range(1, N + 1))
    pre = summary.pretext_accuracy.sel(pretrain_steps=N, seed=0)
    assert float(pre.sel(task="blur_x4")) == float(pre.sel(task="blur_x4_full"))
