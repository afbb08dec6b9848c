"""Record a PyTorch Lightning fit with one callback, then rewind to a recorded step.

Usage: python examples/04_lightning_callback.py [OUT_DIR]   (default: a temporary folder)
Needs the extra: pip install "ckpt-tools[lightning]".
"""

import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckpt_tools
from ckpt_tools.integrations.lightning import RecorderCallback

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
out.mkdir(parents=True, exist_ok=True)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


torch.manual_seed(0)
x, y = torch.randn(512, 20), torch.randint(0, 4, (512,))
train = DataLoader(TensorDataset(x[:448], y[:448]), batch_size=32, shuffle=True)
val = DataLoader(TensorDataset(x[448:], y[448:]), batch_size=64)

# Every update for the first 10, then every 5th; 2 batches per update (accumulation).
store = out / "lightning.zarr"
recorder = RecorderCallback(store, "0:10:1,10:100:5", overwrite=True)
trainer = pl.Trainer(max_epochs=4, accumulate_grad_batches=2, callbacks=[recorder],
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu")
model = Classifier()
trainer.fit(model, train, val)

history = ckpt_tools.open_history(store)
print(history[["loss", "lr", "grad_norm"]])
print("validation loss by step:", history["val_loss"].to_series().round(4).to_dict())

# Rewind: the weights after 10 updates, into a fresh module.
rewound = Classifier()
rewound.load_state_dict(ckpt_tools.load_state_dict(store, 10))
