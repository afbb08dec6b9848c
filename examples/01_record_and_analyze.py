"""Record a hand-written PyTorch loop with a Recorder, then analyse the stored history.

Usage: python examples/01_record_and_analyze.py [OUT_DIR]   (default: a temporary folder)
"""

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import ckpt_tools
import ckpt_tools.analyses  # registers the ds.ckpt accessor
from ckpt_tools.analyses import registry
from ckpt_tools.data import load
from ckpt_tools.store import list_results

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
out.mkdir(parents=True, exist_ok=True)
store = out / "mlp-digits.zarr"

# 1. Any training loop: a small MLP on the embedded 8x8 digits.
data = load("digits")
x = data.x_train.float().flatten(1) / 255
y = data.y_train
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

# 2. Three lines record it: every step up to 20, then every 10th, up to step 60.
with ckpt_tools.Recorder(store, model, "0:20:1,20:61:10", optimizer=opt,
                         overwrite=True) as rec:
    rec.record(0)
    for step in range(1, 61):
        batch = torch.randint(len(y), (64,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.record(step, loss=loss.item())

# 3. Analyse it: in a notebook through the accessor ...
history = ckpt_tools.open_history(store)
tel = history.ckpt.telemetry()
print(tel[["sign_change_fraction", "l2_to_init", "cosine_to_init"]].isel(step=[1, 10, -1])
      .to_dataframe().round(4))
print("first layer at step 60:", history.ckpt.layer("0.weight").sel(step=60).shape)

# ... or store every applicable analysis in the run, as `ckpt analyze` does.
registry.run(store, "telemetry")
print("stored:", [r["path"] for r in list_results(store)])
