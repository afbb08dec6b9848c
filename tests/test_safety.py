"""Safe to open: no pickles, no unsafe torch.load, no names that leave the store, and
malformed input (property-based) raising only the documented errors."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_tools
from ckpt_tools.resume import resume_status
from ckpt_tools.store import (
    HistoryWriter,
    StoreError,
    check_model,
    history_groups,
    read_resume_point,
    store_info,
)
from ckpt_tools.train import train

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = ("ckpt_tools", "analyses", "cli", "tests", "bench", "examples")
BAD_NAMES = ["../x", "/abs", "a/../../b", "..", "a/./b", "~/x", "a\\..\\b"]


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A store left mid-run, with its resume state (the most file kinds a store holds)."""
    out = tmp_path_factory.mktemp("safety") / "r.zarr"

    def crash(step, loss):
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        train(TINY, out, resume_interval=0, on_step=crash)
    return out


# -- no pickles --------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny_run", "interrupted_run"])
def test_no_file_in_a_store_is_a_pickle_and_all_metadata_is_json(which, request):
    store = request.getfixturevalue(which)
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "zarr.json" for p in files) and len(files) > 20
    for path in files:
        head = path.read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), path
        if path.name == "zarr.json":
            json.loads(path.read_text())
        else:  # chunks: under an array's c/ folder, nothing else lives in a store
            assert "c" in path.relative_to(store).parts, path


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node


def test_torch_load_is_only_ever_called_with_weights_only():
    found = 0
    for folder in PROJECT_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for call in _calls(tree):
                owner = call.func.value
                name = owner.id if isinstance(owner, ast.Name) else None
                keywords = {k.arg: k.value for k in call.keywords}
                if call.func.attr == "load" and name == "torch":
                    found += 1
                    flag = keywords.get("weights_only")
                    assert isinstance(flag, ast.Constant) and flag.value is True, (
                        f"{path}:{call.lineno}: torch.load without weights_only=True")
                if call.func.attr == "load" and name in ("np", "numpy"):
                    flag = keywords.get("allow_pickle")
                    assert flag is None or (isinstance(flag, ast.Constant) and not flag.value), (
                        f"{path}:{call.lineno}: numpy.load with allow_pickle")
    assert found >= 1  # the DDP test reads rank 1's weights with torch.load


def test_the_grep_catches_an_unsafe_call(tmp_path):
    tree = ast.parse("import torch\ntorch.load('x.pt')\n")
    (call,) = [c for c in _calls(tree) if c.func.attr == "load"]
    assert "weights_only" not in {k.arg for k in call.keywords}


# -- names that could leave the store ----------------------------------------------------
@pytest.mark.parametrize("name", BAD_NAMES)
def test_group_names_from_users_cannot_leave_the_store(tiny_run, tmp_path, name):
    model = torch.nn.Linear(2, 2)
    out = tmp_path / "s.zarr"
    calls = [
        lambda: ckpt_tools.open_history(tiny_run, name),
        lambda: ckpt_tools.load_state_dict(tiny_run, 0, group=name),
        lambda: ckpt_tools.Recorder(out, model, "0:2:1", group=name),
        lambda: train(TINY, out, group=name),
        lambda: HistoryWriter.reopen(tiny_run, name),
        lambda: read_resume_point(tiny_run, name),
        lambda: resume_status(tiny_run, name),
        lambda: check_model(model, tiny_run, group=name),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="invalid group name"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["s.zarr"])
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_names_inside_a_store_cannot_leave_it(tiny_copy, tmp_path):
    doc = json.loads((tiny_copy / "zarr.json").read_text())
    entries = doc["consolidated_metadata"]["metadata"]
    entries["../../outside"] = entries["train/step"]
    (tiny_copy / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="not a plain name"):
        ckpt_tools.open_store(tiny_copy)


def test_links_out_of_the_store_are_refused(tiny_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(tiny_copy / "train" / "params", elsewhere)
    os.symlink(elsewhere, tiny_copy / "train" / "params")
    with pytest.raises(StoreError, match="links outside the store"):
        ckpt_tools.open_store(tiny_copy)
    with pytest.raises(StoreError, match="links outside the store"):
        HistoryWriter.reopen(tiny_copy, "train")


def test_array_names_from_store_attributes_are_checked(tiny_copy):
    meta_file = tiny_copy / "train" / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["attributes"]["ckpt_tools"]["scalars"] = ["loss", "../../../../tmp/evil"]
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="invalid array name"):
        HistoryWriter.reopen(tiny_copy, "train")
    assert not Path("/tmp/evil").exists()


# -- property-based: malformed input gives only the documented errors --------------------
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_schedule_parser_raises_only_value_error(text):
    with contextlib.suppress(ValueError):
        ckpt_tools.Schedule.parse(text)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
TARGETS = ["zarr.json", "train/zarr.json", "train/params/zarr.json", "train/step/zarr.json",
           "train/committed/zarr.json"]
CHUNKS = ["train/params/c/0/0", "train/step/c/0", "train/committed/c/0", "train/layer/c/0",
          "train/buffers/c/1/0", "train/loss/c/0"]


def _readers(path):
    yield lambda: ckpt_tools.open_store(path)
    yield lambda: ckpt_tools.open_history(path)
    yield lambda: ckpt_tools.load_state_dict(path, 3)
    yield lambda: history_groups(path)
    yield lambda: store_info(path)


def _only_store_errors(path):
    # Opening and the row reads raise StoreError or succeed; a damaged chunk that a lazy
    # xarray view decodes later raises the codec's own error (see docs/reliability.md).
    for read in _readers(path):
        with contextlib.suppress(StoreError):
            read()


def _damaged_copy(tiny_run, edit) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="damaged-"))
    path = tmp / "s.zarr"
    shutil.copytree(tiny_run, path)
    edit(path)
    return path


_SLOW = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SLOW
@given(target=st.sampled_from(TARGETS), data=st.binary(max_size=300))
def test_random_bytes_as_metadata(tiny_run, target, data):
    path = _damaged_copy(tiny_run, lambda p: (p / target).write_bytes(data))
    try:
        _only_store_errors(path)
    finally:
        shutil.rmtree(path.parent)


@_SLOW
@given(target=st.sampled_from(TARGETS), doc=JSON)
def test_random_json_as_metadata(tiny_run, target, doc):
    path = _damaged_copy(tiny_run, lambda p: (p / target).write_text(json.dumps(doc)))
    try:
        _only_store_errors(path)
    finally:
        shutil.rmtree(path.parent)


def _set_attrs(path: Path, attrs) -> None:
    root = json.loads((path / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)  # so readers see the edited group
    (path / "zarr.json").write_text(json.dumps(root))
    meta = json.loads((path / "train" / "zarr.json").read_text())
    meta["attributes"] = {"ckpt_tools": attrs}
    (path / "train" / "zarr.json").write_text(json.dumps(meta))


@_SLOW
@given(attrs=JSON | st.fixed_dictionaries({"kind": st.just("history")}, optional={
    "params": JSON, "buffers": JSON, "eval_metrics": JSON, "scalars": JSON, "config": JSON}))
def test_random_attributes(tiny_run, attrs):
    path = _damaged_copy(tiny_run, lambda p: _set_attrs(p, attrs))
    try:
        _only_store_errors(path)
    finally:
        shutil.rmtree(path.parent)


@_SLOW
@given(target=st.sampled_from(CHUNKS), data=st.binary(max_size=400))
def test_random_chunk_bytes(tiny_run, target, data):
    path = _damaged_copy(tiny_run, lambda p: (p / target).write_bytes(data))
    try:
        _only_store_errors(path)
    finally:
        shutil.rmtree(path.parent)
