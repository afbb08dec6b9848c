"""Two gloo processes fit one LightningModule under strategy="ddp" with RecorderCallback.

Usage: python ddp_lightning.py OUT.zarr   (prints rank0=<recorder active> rank1=<...>;
rank 1 saves its own state after every update to OUT.zarr's folder as rank1_states.pt)
"""

import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt_tools.integrations.lightning import RecorderCallback


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Report(pl.Callback):
    """Says whether this rank's recorder writes; rank 1 keeps a copy after every update."""

    def __init__(self, recorder: RecorderCallback, out: Path):
        self.recorder, self.out, self.states = recorder, out, {}

    def on_train_start(self, trainer, pl_module):
        self.states[0] = copy.deepcopy(pl_module.state_dict())

        def after(optimizer, args, kwargs):
            self.states[len(self.states)] = copy.deepcopy(pl_module.state_dict())

        trainer.optimizers[0].register_step_post_hook(after)

    def on_train_end(self, trainer, pl_module):
        print(f"rank{trainer.global_rank}={self.recorder.recorder.active}", flush=True)
        if trainer.global_rank == 1:
            torch.save(self.states, self.out.parent / "rank1_states.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 6, generator=gen),
                         torch.randint(0, 3, (64,), generator=gen))
    recorder = RecorderCallback(out, "0:20:3")
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, accumulate_grad_batches=2,
        callbacks=[Report(recorder, out), recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Module(), DataLoader(data, batch_size=4))
