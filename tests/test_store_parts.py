"""Rows written in parts by several writers: column runs, per-rank flags, sessions."""

from __future__ import annotations

import numpy as np
import pytest

import ckpt_tools
from ckpt_tools.store import HistoryWriter, StoreError
from ckpt_tools.tensors import TensorSpec


def make(path, n_params=40, steps=(0, 1, 2, 3)) -> HistoryWriter:
    params = [TensorSpec("w", (n_params,), 0, "float32", True)]
    return HistoryWriter.create(path, "train", steps=steps, params=params, buffers=[],
                                attrs={}, root_attrs={})


def test_two_writers_fill_one_row_by_column_runs(tmp_path):
    out = tmp_path / "run.zarr"
    first = make(out)
    second = HistoryWriter.attach(out, "train")
    session = first.start_session(2)
    row = np.arange(40, dtype=np.float32)[None] + 100
    first.write_rows(1, row[:, :10], np.zeros((1, 0), np.float32), columns=[(0, 10)])
    second.write_rows(1, np.concatenate([row[:, 10:20], row[:, 30:]], axis=1), None,
                      columns=[(10, 20), (30, 40)])
    first.write_rows(1, row[:, 20:30], None, columns=[(20, 30)])
    first.mark_parts([1], 0, session)
    assert first.commit_ready(session).size == 0  # rank 1 has not said it is done
    assert ckpt_tools.open_history(out).step.size == 0
    second.mark_parts([1], 1, session)
    assert first.commit_ready(session).tolist() == [1]
    first.close()
    ds = ckpt_tools.open_history(out)
    assert ds.step.values.tolist() == [1]
    np.testing.assert_array_equal(ds.params.values, row)
    assert "part_written" not in ds  # bookkeeping, hidden like the resume arrays


def test_parts_of_an_earlier_session_do_not_commit_a_row(tmp_path):
    out = tmp_path / "run.zarr"
    writer = make(out)
    old = writer.start_session(2)
    writer.mark_parts([2, 3], 1, old)  # rank 1 wrote rows 2 and 3, then the job died
    writer.release()
    writer = HistoryWriter.reopen(out, "train")
    new = writer.start_session(2)
    assert new > old
    writer.mark_parts([2], 0, new)
    assert writer.commit_ready(new).size == 0  # rank 1's flag is from the dead session
    writer.mark_parts([2], 1, new)
    assert writer.commit_ready(new).tolist() == [2]
    writer.release()


def test_flags_follow_the_number_of_ranks(tmp_path):
    out = tmp_path / "run.zarr"
    writer = make(out)
    first = writer.start_session(2)
    writer.mark_parts([0], 0, first)
    writer.mark_parts([0], 1, first)
    session = writer.start_session(3)  # resumed with three ranks: old flags dropped
    writer.mark_parts([0], 0, session)
    writer.mark_parts([0], 1, session)
    assert writer.commit_ready(session).size == 0
    writer.mark_parts([0], 2, session)
    assert writer.commit_ready(session).tolist() == [0]
    writer.release()


def test_attach_needs_a_history(tmp_path):
    with pytest.raises(StoreError, match="no group 'train'"):
        HistoryWriter.attach(tmp_path / "missing.zarr", "train")
