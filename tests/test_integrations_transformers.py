"""Transformers' RecorderCallback: a tiny GPT-2 built from a config, trained by `Trainer`.

Nothing is downloaded. The reference is independent of the callback: hooks on the
torch optimizer itself count the updates, read the gradients it applies (pre-hook) and
deep-copy the state dict after each update (post-hook).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import ckpt_tools  # noqa: E402
from ckpt_tools.integrations.transformers import RecorderCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ACCUMULATE = 2
UPDATES = 9
CLIP = 0.05


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 12), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Reference(transformers.TrainerCallback):
    def __init__(self):
        self.states, self.grad_norms, self.lrs, self.updates = {}, {}, {}, 0
        self.evals, self.exp_avg = {}, {}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evals[self.updates] = metrics["eval_loss"]

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.states[0] = copy.deepcopy(model.state_dict())
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper

        def before(opt, a, kw):
            self.grad_norms[self.updates + 1] = {
                n: p.grad.norm().item() for n, p in model.named_parameters()}
            self.lrs[self.updates + 1] = opt.param_groups[0]["lr"]

        def after(opt, a, kw):
            self.updates += 1
            self.states[self.updates] = copy.deepcopy(model.state_dict())
            self.exp_avg[self.updates] = torch.cat([
                opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()]).numpy().copy()

        inner.register_step_pre_hook(before)
        inner.register_step_post_hook(after)


def _config():
    return transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2,
                                   n_head=2, bos_token_id=0, eos_token_id=0)


def _train(tmp_path, schedule, **options):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_config())
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
        gradient_accumulation_steps=ACCUMULATE, max_steps=UPDATES, learning_rate=1e-2,
        lr_scheduler_type="linear", max_grad_norm=CLIP, eval_strategy="steps", eval_steps=4,
        per_device_eval_batch_size=8, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True, logging_strategy="no",
    )
    reference = _Reference()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(48, 1),
                                   eval_dataset=_Tokens(8, 2))
    trainer.add_callback(RecorderCallback(tmp_path / "run.zarr", schedule, **options))
    trainer.add_callback(reference)
    trainer.train()
    return reference


def test_rows_grad_norms_and_evaluations_match_the_reference(tmp_path):
    ref = _train(tmp_path, "0:4:1,4:10:3", optimizer_state=True)
    out = tmp_path / "run.zarr"
    assert ref.updates == UPDATES
    ds = ckpt_tools.open_history(out)
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4, 7, 9]
    layers = [str(n) for n in ds.layer.values]
    for step in ds.step.values.tolist():
        got = ckpt_tools.load_state_dict(out, step)
        assert set(got) == set(ref.states[step])
        for name, tensor in got.items():
            assert torch.equal(tensor, ref.states[step][name]), (step, name)
        if step:
            row = ds.sel(step=step)
            expect = [ref.grad_norms[step][n] for n in layers]
            np.testing.assert_allclose(row.grad_norm.values, expect, rtol=1e-5)
            assert float(np.linalg.norm(row.grad_norm.values)) <= CLIP * (1 + 1e-4)
            assert float(row.lr) == ref.lrs[step]
            # The Trainer's AdamW is handed to the Recorder: its state is recorded too.
            np.testing.assert_array_equal(row.optim_exp_avg.values, ref.exp_avg[step])
    assert np.isnan(ds.grad_norm.sel(step=0)).all()
    # Every eval_steps updates and at the end, on the step counted by the optimizer hooks.
    assert ds.eval_step.values.tolist() == [4, 8, 9] == sorted(ref.evals)
    for step, loss in ref.evals.items():
        assert float(ds.eval_loss.sel(eval_step=step)) == loss
    assert "eval_runtime" not in ds
