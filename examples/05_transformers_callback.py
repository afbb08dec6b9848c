"""Record a Hugging Face `Trainer` run with one callback: a tiny GPT-2 built from a
config (no weights downloaded) on random tokens.

Usage: python examples/05_transformers_callback.py [OUT_DIR]   (default: a temporary folder)
Needs the extra: pip install "ckpt-tools[transformers]".
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

import ckpt_tools
from ckpt_tools.integrations.transformers import RecorderCallback

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
out.mkdir(parents=True, exist_ok=True)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.ids = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=16, n_layer=2,
                                 n_head=2, bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(config)
args = transformers.TrainingArguments(
    output_dir=str(out / "hf"), max_steps=20, per_device_train_batch_size=8,
    gradient_accumulation_steps=2, learning_rate=3e-3, eval_strategy="steps", eval_steps=10,
    report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
    disable_tqdm=True,
)
trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(128, 1),
                               eval_dataset=RandomTokens(16, 2))
store = out / "gpt2.zarr"
trainer.add_callback(RecorderCallback(store, "log2:20", overwrite=True))  # 0, 1, 2, 4, 8, 16, 20
trainer.train()

history = ckpt_tools.open_history(store)
print(history[["lr", "grad_norm"]])
print("eval loss by step:", history["eval_loss"].to_series().round(4).to_dict())
# Rewind: the weights after 8 updates.
model.load_state_dict(ckpt_tools.load_state_dict(store, 8))
