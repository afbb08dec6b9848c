"""A custom analysis in a few lines of xarray: which fraction of each layer's weights ever
has the opposite sign of its initial value, over the whole recorded history.

Usage: python examples/02_custom_analysis.py [OUT_DIR]   (default: a temporary folder)
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

import ckpt_tools
from ckpt_tools.store import read_result, write_result
from ckpt_tools.train import TrainConfig, train

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
out.mkdir(parents=True, exist_ok=True)
store = out / "convnet-digits.zarr"

# A tiny recorded run (the built-in loop; `ckpt record` does the same).
train(TrainConfig(model="convnet", dataset="digits", width=8, steps=30, batch_size=64,
                  schedule="0:10:1,10:31:5", eval_schedule="0:31:30"), store, overwrite=True)

# The analysis, lazily and chunk by chunk: nothing is loaded before `.compute()`.
history = ckpt_tools.open_history(store)
w = history["params"]  # (step, param)
flipped = (np.sign(w) * np.sign(w.isel(step=0)) < 0).any("step")  # (param,)
owner = xr.DataArray(np.repeat(history["layer"].values, history["layer_size"].values),
                     dims="param", name="layer")
ever = flipped.groupby(owner).mean().rename("ever_changed_sign").compute()
print(ever.to_series().round(3))

# Stored next to the built-in analyses, it opens with the rest of the store.
write_result(store, "ever_changed_sign", ever.to_dataset())
print(read_result(store, "ever_changed_sign"))
