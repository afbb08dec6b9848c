"""`ckpt import` and `ckpt export`: every format generated here, every row checked bit for bit.

The references are state dicts captured from the models in memory when each checkpoint
was saved, never read back from the files the import reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ckpt_tools
from ckpt_tools.cli.app import app
from ckpt_tools.store import history_check

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_rows_match(store, references, *, group="train", names=None):
    """Every step's stored tensors equal the reference state dicts, bits and dtypes."""
    ds = ckpt_tools.open_history(store, group)
    assert sorted(int(s) for s in ds.step.values) == sorted(references)
    for step, ref in references.items():
        ref = {k: v for k, v in ref.items() if names is None or k in names}
        got = ckpt_tools.load_state_dict(store, step, group=group)
        assert set(got) == set(ref), step
        for name, tensor in ref.items():
            assert got[name].dtype == tensor.dtype, (step, name)
            assert got[name].shape == tensor.shape, (step, name)
            assert bits(got[name]) == bits(tensor), (step, name)
        # The stored row itself: float32 values of the tensors in table order, and its hash.
        meta = ds.attrs["ckpt_tools"]
        row = ds.sel(step=step)
        expected = [np.concatenate([ref[s["name"]].reshape(-1).float().numpy() for s in meta[k]]
                                   or [np.zeros(0, np.float32)]) for k in ("params", "buffers")]
        assert row.params.values.tobytes() == expected[0].tobytes()
        assert row.buffers.values.tobytes() == expected[1].tobytes()
        digest = hashlib.sha256(expected[0].tobytes() + expected[1].tobytes()).digest()
        assert bytes(row.row_hash.values) == digest


def _gpt2(dtype=torch.float32):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=48, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def _train_step(model, step):
    """Change the weights as an update would (deterministically per step)."""
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A Trainer-style output folder: checkpoint-N/ with sharded safetensors + trainer_state."""
    root = tmp_path_factory.mktemp("hf") / "output"
    model, refs = _gpt2(), {}
    for step in (0, 1, 2, 5):
        if step:
            _train_step(model, step)
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder, max_shard_size="8KB")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        refs[step] = _state(model)
    model.save_pretrained(root)  # the final model beside its checkpoints, as Trainer saves it
    assert (root / "checkpoint-0" / "model.safetensors.index.json").is_file()
    saved = set(json.loads((root / "checkpoint-0" / "model.safetensors.index.json")
                           .read_text())["weight_map"])
    return root, refs, saved


def test_hf_checkpoint_folders_sharded_safetensors(hf_run, tmp_path):
    root, refs, saved = hf_run
    out = tmp_path / "run.zarr"
    result = runner.invoke(app, ["import", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "imported 4 checkpoints (steps 0 to 5" in result.output
    assert "warning" not in result.output
    assert_rows_match(out, refs, names=saved)
    meta = ckpt_tools.open_history(out).attrs["ckpt_tools"]
    assert meta["model"] == "GPT2LMHeadModel"
    assert {e["step_from"] for e in meta["imported_from"]} == {"trainer_state.json"}


def test_export_safetensors_loads_with_from_pretrained(hf_run, tmp_path):
    root, refs, saved = hf_run
    out = tmp_path / "run.zarr"
    assert runner.invoke(app, ["import", str(root), "--out", str(out)]).exit_code == 0
    folder = tmp_path / "exported"
    folder.mkdir()
    shutil.copy(root / "checkpoint-2" / "config.json", folder)
    result = runner.invoke(app, ["export", str(out), "--step", "2", "--format", "safetensors",
                                 "-o", str(folder / "model.safetensors")])
    assert result.exit_code == 0, result.output
    model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    got = model.state_dict()
    assert set(got) == set(refs[2])
    for name, tensor in refs[2].items():  # the tied lm_head too
        assert bits(got[name]) == bits(tensor), name
    again = runner.invoke(app, ["export", str(out), "--step", "2", "-o",
                                str(folder / "model.safetensors")])
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output


def test_half_precision_single_safetensors_with_step_regex(tmp_path):
    model, refs = _gpt2(torch.bfloat16), {}
    files = []
    for step in (0, 3, 7):
        if step:
            _train_step(model, step)
        refs[step] = _state(model)
        path = tmp_path / f"weights_s{step}_v2.safetensors"
        safetensors_torch.save_file({k: v for k, v in refs[step].items()
                                     if k != "lm_head.weight"}, str(path))
        files.append(str(path))
    out = tmp_path / "run.zarr"
    result = runner.invoke(app, ["import", *files, "--out", str(out), "--step-regex",
                                 r"_s(\d+)_"])
    assert result.exit_code == 0, result.output
    names = set(refs[0]) - {"lm_head.weight"}
    assert_rows_match(out, refs, names=names)
    assert ckpt_tools.load_state_dict(out, 3)["transformer.wte.weight"].dtype == torch.bfloat16
    exported = tmp_path / "s3.safetensors"
    assert runner.invoke(app, ["export", str(out), "--step", "3", "-o", str(exported)]
                         ).exit_code == 0
    back = safetensors_torch.load_file(str(exported))
    assert all(bits(back[k]) == bits(refs[3][k]) and back[k].dtype == torch.bfloat16
               for k in names)


def test_sharded_pytorch_bin_with_hand_written_index(tmp_path):
    model, refs = _gpt2(torch.float16), {}
    for step in (0, 10, 20):
        if step:
            _train_step(model, step)
        refs[step] = state = _state(model)
        folder = tmp_path / f"step{step}"
        folder.mkdir()
        names = list(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
        for shard, keys in shards.items():
            torch.save({k: state[k] for k in keys}, folder / shard)
        index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
        # A stale copy of a tensor in a shard the index does not assign it to is ignored.
        stale = {**{k: state[k] for k in shards["pytorch_model-00002-of-00002.bin"]},
                 names[0]: state[names[0]] + 1}
        torch.save(stale, folder / "pytorch_model-00002-of-00002.bin")
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    out = tmp_path / "run.zarr"
    result = runner.invoke(app, ["import", *(str(tmp_path / f"step{s}") for s in (20, 0, 10)),
                                 "--out", str(out), "--group", "imported/fp16"])
    assert result.exit_code == 0, result.output
    assert_rows_match(out, refs, group="imported/fp16")
    assert list(ckpt_tools.open_history(out, "imported/fp16").step.values) == [0, 10, 20]


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8),
                                        torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


def test_plain_torch_files_and_export_back(tmp_path):
    torch.manual_seed(1)
    net, opt, refs = _Net(), None, {}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(4):
        if step:
            loss = net(torch.randn(16, 6)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        refs[step] = _state(net)
        if step % 2:
            torch.save({"model": net.state_dict(), "step": step}, tmp_path / f"ckpt_{step}.pth")
        else:
            torch.save(net.state_dict(), tmp_path / f"ckpt_{step}.pt")
    out = tmp_path / "run.zarr"
    result = runner.invoke(app, ["import", *sorted(str(p) for p in tmp_path.glob("ckpt_*")),
                                 "--out", str(out), "--schedule", "0:4:1"])
    assert result.exit_code == 0, result.output
    assert_rows_match(out, refs)
    meta = ckpt_tools.open_history(out).attrs["ckpt_tools"]
    assert [p["name"] for p in meta["buffers"]] == [
        "body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"]
    exported = tmp_path / "s3.pt"
    assert runner.invoke(app, ["export", str(out), "--step", "3", "--format", "torch", "-o",
                               str(exported)]).exit_code == 0
    fresh = _Net()
    fresh.load_state_dict(torch.load(exported, weights_only=True))
    assert all(bits(v) == bits(refs[3][k]) for k, v in fresh.state_dict().items())


def test_lightning_checkpoints(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _Net()

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Capture(lightning.Callback):
        def __init__(self):
            self.refs = {}

        def on_train_batch_end(self, trainer, module, *args):
            self.refs[trainer.global_step] = _state(module)

    torch.manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    capture = Capture()
    saver = lightning.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1,
                                                save_top_k=-1, save_last=True)
    trainer = lightning.Trainer(max_steps=4, callbacks=[capture, saver], logger=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu")
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
    out = tmp_path / "run.zarr"
    assert (tmp_path / "ckpts" / "last.ckpt").is_file()  # a copy, left out of the series
    result = runner.invoke(app, ["import", str(tmp_path / "ckpts"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_rows_match(out, capture.refs)
    meta = ckpt_tools.open_history(out).attrs["ckpt_tools"]
    assert {e["step_from"] for e in meta["imported_from"]} == {"global_step"}


def fake_hub_cache(cache, repo, revisions):
    """Lay out `revisions` ({name: {file: bytes}}) as huggingface_hub caches a repository."""
    base = cache / ("models--" + repo.replace("/", "--"))
    for sub in ("blobs", "refs", "snapshots"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, files in revisions.items():
        commit = hashlib.sha1(name.encode()).hexdigest()
        (base / "refs" / name).write_text(commit)
        snap = base / "snapshots" / commit
        snap.mkdir()
        for filename, data in files.items():
            blob = hashlib.sha256(data).hexdigest()
            (base / "blobs" / blob).write_bytes(data)
            os.symlink(f"../../blobs/{blob}", snap / filename)


def test_hugging_face_cache_offline(tmp_path, monkeypatch):
    model, refs, revisions = _gpt2(torch.float16), {}, {}
    config = None
    for step in (0, 1, 2, 4, 8):
        if step:
            _train_step(model, step)
        refs[step] = _state(model)
        folder = tmp_path / "saved" / str(step)
        model.save_pretrained(folder)
        config = (folder / "config.json").read_bytes()
        revisions[f"step{step}"] = {"model.safetensors": (folder / "model.safetensors")
                                    .read_bytes(), "config.json": config}
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/tiny", revisions)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run.zarr"
    result = runner.invoke(app, ["import", "--hf-repo", "org/tiny", "--revisions",
                                 "step0,step1,step2,step8", "--hf-cache", str(cache), "--out",
                                 str(out), "--schedule", "log2:8"])
    assert result.exit_code == 0, result.output
    assert "1 scheduled steps between 0 and 8 are missing: 4" in result.output
    del refs[4]
    assert_rows_match(out, refs, names=set(refs[0]) - {"lm_head.weight"})
    assert ckpt_tools.open_history(out).attrs["ckpt_tools"]["model"] == "GPT2LMHeadModel"


# -- integrity ---------------------------------------------------------------------------
def _series(tmp_path, steps_in_metadata, *, same=()):
    """checkpoint-1, -2, ... folders whose trainer_state.json says `steps_in_metadata`."""
    net = _Net()
    for i, step in enumerate(steps_in_metadata, start=1):
        if i not in same:
            _train_step(net, i)
        folder = tmp_path / "series" / f"checkpoint-{i}"
        folder.mkdir(parents=True)
        safetensors_torch.save_file(net.state_dict(), str(folder / "model.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return tmp_path / "series"


def test_import_warns_about_a_mislabelled_and_misordered_series(tmp_path):
    series = _series(tmp_path, [1, 3, 2, 4], same={4})  # checkpoint-4 repeats checkpoint-3
    out = tmp_path / "run.zarr"
    result = runner.invoke(app, ["import", str(series), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "steps 2, 4 hold identical weights" in text
    assert "steps out of order: step 2 after 3" in text
    assert "checkpoint-2: its trainer_state.json says step 3, its name 2" in text
    info = " ".join(runner.invoke(app, ["info", str(out)]).output.split())
    assert "steps 2, 4 hold identical weights" in info
    assert "steps out of order: step 2 after 3" in info
    summary = json.loads(runner.invoke(app, ["info", str(out), "--json"]).output)
    assert len(summary["groups"][0]["warnings"]) == 2


def test_recorded_runs_carry_row_hashes_and_report_gaps(tiny_run, tmp_path):
    ds = ckpt_tools.open_history(tiny_run)
    for i in range(ds.sizes["step"]):
        raw = ds.params.values[i].tobytes() + ds.buffers.values[i].tobytes()
        assert bytes(ds.row_hash.values[i]) == hashlib.sha256(raw).digest()
    assert history_check(tiny_run) == []
    net = torch.nn.Linear(3, 2)
    out = tmp_path / "gap.zarr"
    with ckpt_tools.Recorder(out, net, [0, 1, 2, 3, 4]) as rec:
        for step in (0, 1, 3, 4):  # step 2 is never recorded
            _train_step(net, step)
            rec.record(step)
    assert history_check(out) == ["1 scheduled steps between 0 and 4 are missing: 2"]


# -- bad input: one line, exit status 2, the store byte for byte as it was ------------------
def _hashes(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


class _NotAllowed:
    pass


def _bad_sources(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    unknown = tmp_path / "weights.npz"
    unknown.write_bytes(b"PK")
    pickled = tmp_path / "with_code.pt"
    torch.save({"weight": torch.ones(2), "extra": _NotAllowed()}, pickled)
    other = tmp_path / "other_arch"
    other.mkdir()
    wide = _Net()
    wide.body[3] = torch.nn.Linear(8, 5)  # another head
    safetensors_torch.save_file(wide.state_dict(), str(other / "model.safetensors"))
    (other / "trainer_state.json").write_text(json.dumps({"global_step": 9}))
    nameless = tmp_path / "final.safetensors"
    safetensors_torch.save_file(_Net().state_dict(), str(nameless))
    same_step = tmp_path / "copy-of-2"
    same_step.mkdir()
    safetensors_torch.save_file(_Net().state_dict(), str(same_step / "model.safetensors"))
    (same_step / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return {
        "nameless": ([str(nameless)], "cannot tell the step of"),
        "same step": (["SERIES", str(same_step)], "SERIES/checkpoint-2 and "
                      f"{same_step} both hold step 2"),
        "text": ([str(text)], "notes.pt is not a PyTorch checkpoint"),
        "garbage": ([str(garbage)], "garbage.safetensors is not a safetensors file"),
        "unknown": ([str(unknown)], "weights.npz is not a checkpoint ckpt import reads"),
        "pickle": ([str(pickled)], "torch.load(weights_only=True) refuses it (Unsupported "
                   "global: GLOBAL test_import._NotAllowed)"),
        "mixed": (["SERIES", str(other)], "other_arch has another architecture than "
                  "SERIES/checkpoint-1: tensor 'body.3.bias' has shape (5,), not (3,)"),
    }


@pytest.mark.parametrize("case", ["text", "garbage", "unknown", "pickle", "mixed", "revision",
                                  "nameless", "same step"])
def test_bad_input_leaves_the_store_as_it_was(tmp_path, monkeypatch, case):
    series = _series(tmp_path, [1, 2])
    existing = tmp_path / "run.zarr"
    assert runner.invoke(app, ["import", str(series), "--out", str(existing)]).exit_code == 0
    if case == "revision":
        fake_hub_cache(tmp_path / "hub", "org/tiny", {"step0": {
            "model.safetensors": (series / "checkpoint-1" / "model.safetensors").read_bytes()}})
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        args = ["--hf-repo", "org/tiny", "--revisions", "step0,step1", "--hf-cache",
                str(tmp_path / "hub")]
        message = "revision 'step1' of org/tiny is not in the Hugging Face cache"
    else:
        args, message = _bad_sources(tmp_path)[case]
        args = [a.replace("SERIES", str(series)) for a in args]
        message = message.replace("SERIES", str(series))
    before = _hashes(existing)
    for out, group in ((existing, "more"), (tmp_path / "new.zarr", "train")):
        result = runner.invoke(app, ["import", *args, "--out", str(out), "--group", group])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert message in " ".join(lines[0].split()), lines[0]
    assert _hashes(existing) == before
    assert not (tmp_path / "new.zarr").exists()


def test_streaming_across_chunk_and_shard_boundaries(tmp_path):
    """Rows wider than a chunk, tensors straddling chunks and shards, several row blocks."""
    from ckpt_tools.importer import find_checkpoints, plan_series
    from ckpt_tools.importer.write import write_series
    from ckpt_tools.store import HistoryWriter
    from ckpt_tools.store.layout import PARAM_CHUNK

    gen = torch.Generator().manual_seed(3)
    state = {"emb.weight": torch.randn(1100, 1000, generator=gen).to(torch.bfloat16),
             "head.weight": torch.randn(333, 7, generator=gen).T,  # saved non-contiguous
             "head.bias": torch.randn(7, generator=gen).to(torch.float16),
             "scale": torch.tensor(0.5)}
    refs, paths = {}, []
    for step in range(5):
        state = {k: (v.float() + 0.01 * step).to(v.dtype) for k, v in state.items()}
        state["head.weight"] = state["head.weight"].T.contiguous().T
        refs[step] = {k: v.clone() for k, v in state.items()}
        path = tmp_path / (f"s{step}.safetensors" if step % 2 else f"s{step}.pt")
        if step % 2:
            safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        paths.append(path)
    series = plan_series(find_checkpoints(paths))
    n = series.params[-1].stop
    assert n > 4 * PARAM_CHUNK  # sharded in format 2
    out = tmp_path / "run.zarr"
    writer = HistoryWriter.create(out, "train", steps=[r.step for r in series.rows],
                                  params=series.params, buffers=series.buffers, attrs={},
                                  root_attrs={}, chunk_steps=2,
                                  shard_bytes=2 * 2 * PARAM_CHUNK * 4)
    assert writer.block_shape() == (2, 2 * PARAM_CHUNK)  # 3 row blocks x 3 column blocks
    write_series(writer, series)
    writer.close()
    assert_rows_match(out, refs)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_export_a_recorded_step_into_the_model(tiny_run, tmp_path, fmt):
    from conftest import TINY

    from ckpt_tools.train import build

    out = tmp_path / f"step5.{fmt}"
    result = runner.invoke(app, ["export", str(tiny_run), "--step", "5", "--format", fmt,
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    state = (torch.load(out, weights_only=True) if fmt == "torch"
             else safetensors_torch.load_file(str(out)))
    model, _ = build(TINY)
    model.load_state_dict(state)
    want = ckpt_tools.load_state_dict(tiny_run, 5)
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and bits(got[k]) == bits(want[k]) for k in want)
    missing = runner.invoke(app, ["export", str(tiny_run), "--step", "21", "-o",
                                  str(tmp_path / "x.pt")])
    assert missing.exit_code == 1 and "step 21 is not stored" in missing.output
    assert not (tmp_path / "x.pt").exists()
