"""Import a series of saved checkpoints into a store, check it, and export a step back.

Usage: python examples/06_import_and_export.py [OUT_DIR]   (default: a temporary folder)
Needs the extra: pip install "ckpt-tools[hub]".
"""

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ckpt_tools
from ckpt_tools.exporter import export_step
from ckpt_tools.importer import find_checkpoints, import_checkpoints

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
saved = out / "saved"
saved.mkdir(parents=True, exist_ok=True)

# A loop that saves its own checkpoints, as many do: every 5 updates, in half precision.
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
for step in range(21):
    if step:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if step % 5 == 0:
        half = {k: v.half() for k, v in model.state_dict().items()}
        save_file(half, str(saved / f"step-{step}.safetensors"))
# One checkpoint saved under the wrong name: step 15's weights again, named step 20.
save_file(load_file(str(saved / "step-15.safetensors")), str(saved / "step-20.safetensors"))

store = out / "imported.zarr"
report = import_checkpoints(store, find_checkpoints([saved]), schedule="0:21:5",
                            overwrite=True)
print(f"imported steps {list(report.steps)} ({report.parameters} parameters)")
for line in report.warnings:
    print("warning:", line)  # steps 15, 20 hold identical weights ...
assert any("15, 20 hold identical weights" in line for line in report.warnings)

# The rows are the saved values exactly, and come back in float16.
state = ckpt_tools.load_state_dict(store, 10)
assert state["0.weight"].dtype == torch.float16
assert torch.equal(state["0.weight"], load_file(str(saved / "step-10.safetensors"))["0.weight"])

# Export step 10 and load it into a model.
exported = export_step(store, 10, out / "step10.pt", fmt="torch", overwrite=True)
model.half().load_state_dict(torch.load(exported, weights_only=True))
print(f"exported step 10 to {exported}")
