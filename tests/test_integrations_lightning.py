"""Lightning's RecorderCallback: one row per optimizer update, bit for bit.

The reference is taken independently of the callback: an optimizer step post-hook
counts updates itself and deep-copies the state dict after each one.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import ckpt_tools  # noqa: E402
from ckpt_tools.integrations.lightning import RecorderCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ACCUMULATE = 2
BATCHES = 9  # per epoch: the last update of each epoch has a single batch
EPOCHS = 3
UPDATES = EPOCHS * -(-BATCHES // ACCUMULATE)  # 15
CLIP = 0.5


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"width": 16})
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Linear(16, 3))
        self.losses: list[tuple[int, float]] = []  # (updates done before it, loss)
        self.val_losses: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append((self.trainer.global_step, loss.item()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if not self.trainer.sanity_checking:
            self.val_losses.setdefault(self.trainer.global_step, []).append(loss.item())
        self.log("val_loss", loss)
        self.log("train_like", 1.0)  # not a validation name: not stored

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class _Reference(pl.Callback):
    """Copies of the state after every update, counted by an optimizer post-hook."""

    def __init__(self):
        self.states, self.grad_norms, self.momentum, self.updates = {}, {}, {}, 0

    def on_train_start(self, trainer, pl_module):
        self.states[0] = copy.deepcopy(pl_module.state_dict())

        def after_update(optimizer, args, kwargs):
            self.updates += 1
            self.states[self.updates] = copy.deepcopy(pl_module.state_dict())
            self.grad_norms[self.updates] = {
                n: p.grad.norm().item() for n, p in pl_module.named_parameters()}
            self.momentum[self.updates] = torch.cat([
                optimizer.state[p]["momentum_buffer"].reshape(-1)
                for p in pl_module.parameters()]).numpy().copy()

        trainer.optimizers[0].register_step_post_hook(after_update)


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    return DataLoader(data, batch_size=8)


def _fit(out, schedule, **options):
    torch.manual_seed(0)
    module, reference = _Module(), _Reference()
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP,
        callbacks=[RecorderCallback(out, schedule, **options), reference],
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
    )
    trainer.fit(module, _data(8 * BATCHES, 1), _data(16, 2))
    return module, reference


def test_rows_match_independent_copies_under_accumulation(tmp_path):
    out = tmp_path / "run.zarr"
    module, ref = _fit(out, "0:6:1,6:16:4", optimizer_state=True)
    assert ref.updates == UPDATES
    ds = ckpt_tools.open_history(out)
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 14, 15]
    for step in ds.step.values.tolist():
        if step:  # the trainer's optimizer is the Recorder's: its momentum is recorded
            np.testing.assert_array_equal(ds.optim_momentum_buffer.sel(step=step).values,
                                          ref.momentum[step])
        got = ckpt_tools.load_state_dict(out, step)
        assert set(got) == set(ref.states[step])
        for name, tensor in got.items():
            assert tensor.dtype == ref.states[step][name].dtype, (step, name)
            assert torch.equal(tensor, ref.states[step][name]), (step, name)


def test_scalars_grad_norms_and_validation(tmp_path):
    out = tmp_path / "run.zarr"
    module, ref = _fit(out, "0:16:1")
    ds = ckpt_tools.open_history(out)
    layers = [str(n) for n in ds.layer.values]
    clipped = 0
    for step in range(1, UPDATES + 1):
        row = ds.sel(step=step)
        losses = [v for done, v in module.losses if done == step - 1]
        assert len(losses) in (1, ACCUMULATE)
        assert float(row.loss) == pytest.approx(np.mean(losses), rel=1e-6)
        assert float(row.lr) == pytest.approx(0.5 * 0.9 ** (step - 1), rel=1e-12)
        expect = [ref.grad_norms[step][n] for n in layers]
        np.testing.assert_allclose(row.grad_norm.values, expect, rtol=1e-5)
        total = float(np.linalg.norm(row.grad_norm.values))
        assert total <= CLIP * (1 + 1e-4)
        clipped += total > CLIP * 0.99
    assert clipped > UPDATES // 2  # clipping was active: the norms are the clipped ones
    assert np.isnan(ds.sel(step=0).loss)
    # Validation runs at each epoch's end (the sanity check is not recorded).
    assert ds.eval_step.values.tolist() == [5, 10, 15] == sorted(module.val_losses)
    for step, losses in module.val_losses.items():
        assert float(ds.val_loss.sel(eval_step=step)) == pytest.approx(np.mean(losses), rel=1e-6)
    assert "train_like" not in ds


def test_second_fit_into_the_same_group_needs_overwrite(tmp_path):
    out = tmp_path / "run.zarr"
    _fit(out, "0:16:5")
    with pytest.raises(ckpt_tools.StoreError, match="already exists"):
        _fit(out, "0:16:5")
    _, ref = _fit(out, "0:16:5", overwrite=True, group="train")
    got = ckpt_tools.load_state_dict(out, 15)
    assert all(torch.equal(got[k], ref.states[15][k]) for k in got)


def test_ddp_only_rank_zero_writes(tmp_path):
    script = Path(__file__).with_name("ddp_lightning.py")
    out = tmp_path / "ddp.zarr"
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = dict(re.findall(r"(rank\d)=(True|False)", done.stdout))
    assert ranks == {"rank0": "True", "rank1": "False"}
    # 64 examples over 2 ranks in batches of 4: 8 batches a rank, 4 updates an epoch.
    states = torch.load(tmp_path / "rank1_states.pt", weights_only=True)
    assert sorted(states) == list(range(9))
    ds = ckpt_tools.open_history(out)
    assert ds.step.values.tolist() == [0, 3, 6, 8]
    # DDP keeps the parameters identical on both ranks, so rank 1's copies are rank 0's;
    # BatchNorm's running statistics are each rank's own (DDP broadcasts rank 0's at forward).
    for step in ds.step.values.tolist():
        got = ckpt_tools.load_state_dict(out, step)
        assert set(got) == set(states[step])
        for name, tensor in states[step].items():
            if "running" not in name:
                assert torch.equal(got[name], tensor), (step, name)
