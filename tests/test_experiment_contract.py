"""A new experiment is one module plus one registry line, and ``ckpt <name>`` runs it."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from ckpt_tools import load_state_dict, open_history
from ckpt_tools.analyses.experiments import registry
from ckpt_tools.analyses.experiments.contract import Experiment, setting
from ckpt_tools.store import read_result

TOY = '''
"""Toy experiment: continue the recorded run from step k with a scaled learning rate."""

from dataclasses import dataclass, replace

import numpy as np
import xarray as xr

from ckpt_tools import load_state_dict
from ckpt_tools.analyses.experiments.contract import Experiment, SummaryTable, setting
from ckpt_tools.analyses.experiments.pruning import dense_config, final_eval, train_sparse
from ckpt_tools.store import history_groups, write_result


def _scales(text):
    return tuple(float(v) for v in text.split(","))


@dataclass(frozen=True)
class Settings:
    rewind: int = setting(help="Step k to continue from.")
    scales: tuple = setting((1.0,), help="Learning-rate factors, comma-separated.",
                            parse=_scales)
    schedule: str = setting("0:41:20", help="Checkpoint schedule of each run.")

    def __post_init__(self):
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")


def run(store, settings, progress):
    config = dense_config(store)
    for scale in settings.scales:
        group = EXPERIMENT.group(rewind=settings.rewind, scale=scale)
        progress(f"training {group}")
        train_sparse(store, replace(config, lr=config.lr * scale), group=group,
                     init=load_state_dict(store, settings.rewind), start_step=settings.rewind,
                     mask=None, schedule=settings.schedule,
                     attrs={"kind": "toy", "scale": scale})
    result = summary(store)
    write_result(store, "toy_summary", result)
    return result


def summary(store):
    found = {}
    for group in history_groups(store):
        parts = EXPERIMENT.parse_group(group, "rewind", "scale")
        if parts is not None:
            found[float(parts["scale"])] = final_eval(store, group)["test_accuracy"]
    scales = sorted(found)
    return xr.Dataset({"test_accuracy": ("scale", np.array([found[s] for s in scales]))},
                      coords={"scale": np.array(scales)})


EXPERIMENT = Experiment(
    name="toy", help="Continue from step k with a scaled learning rate.", settings=Settings,
    run=run, summary=summary, summary_name="toy_summary",
    presets={"smoke": {"rewind": 20, "scales": (0.5, 2.0)}},
    describe=lambda s, settings: SummaryTable(
        "toy", ("scale", "test accuracy"),
        [(f"{float(c):g}", f"{float(a):.4f}") for c, a in zip(s.scale.values,
                                                              s.test_accuracy.values)]),
)
'''


@pytest.fixture
def toy_cli(tmp_path, monkeypatch):
    (tmp_path / "toy_experiment.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.EXPERIMENTS, "toy", "toy_experiment")  # the registry line
    import ckpt_tools.cli.app as cli_app

    yield importlib.reload(cli_app).app
    monkeypatch.undo()
    sys.modules.pop("toy_experiment", None)
    importlib.reload(cli_app)


@pytest.mark.usefixtures("one_thread")
def test_a_registered_toy_experiment_runs_through_the_cli(toy_cli, tiny_copy):
    runner = CliRunner()
    help_text = runner.invoke(toy_cli, ["toy", "--help"], terminal_width=200).output
    assert "--rewind" in help_text and "Learning-rate factors" in help_text
    result = runner.invoke(toy_cli, ["toy", str(tiny_copy), "--preset", "smoke",
                                     "--scales", "0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    group = "experiments/toy/rewind_20/scale_0.5"
    history = open_history(tiny_copy, group)
    assert history.step.values[0] == 20 and history.step.values[-1] == 40
    # the continuation starts exactly from the stored weights at step 20
    start, stored = load_state_dict(tiny_copy, 20, group=group), load_state_dict(tiny_copy, 20)
    assert all(np.array_equal(start[k].numpy(), stored[k].numpy()) for k in stored)
    summary = read_result(tiny_copy, "toy_summary")
    assert summary.scale.values.tolist() == [0.5]
    assert float(summary.test_accuracy[0]) == float(history.test_accuracy.values[-1])
    assert f"{float(summary.test_accuracy[0]):.4f}" in result.output
    assert "summary stored in analyses/toy_summary" in result.output


def test_generated_options_validate_like_the_settings(toy_cli, tiny_copy):
    runner = CliRunner()
    missing = runner.invoke(toy_cli, ["toy", str(tiny_copy)])
    assert missing.exit_code == 2
    assert "missing --rewind (or give --preset smoke)" in missing.output
    bad = runner.invoke(toy_cli, ["toy", str(tiny_copy), "--rewind", "5", "--scales", "-1"])
    assert bad.exit_code == 2 and "scales must be positive" in bad.output
    assert not (tiny_copy / "experiments").exists()


def test_the_contract_names_and_parses_groups():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class S:
        k: int = setting(0, help="k")

    exp = Experiment(name="demo", help="-", settings=S, run=None, summary=None,
                     summary_name="demo_summary", presets={"small": {"k": 1}})
    group = exp.group(rewind=3, seed=1)
    assert group == "experiments/demo/rewind_3/seed_1"
    assert exp.parse_group(group, "rewind", "seed") == {"rewind": "3", "seed": "1"}
    assert exp.parse_group("experiments/other/rewind_3/seed_1", "rewind", "seed") is None
    assert exp.make_settings("small") == S(k=1) and exp.make_settings("small", k=4) == S(k=4)
    with pytest.raises(ValueError, match="unknown fields"):
        Experiment(name="demo", help="-", settings=S, run=None, summary=None,
                   summary_name="x", presets={"bad": {"nope": 1}})
