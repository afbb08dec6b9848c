"""Sharded against unsharded `params`: files, write and read speed, memory while writing.

    python bench/shards.py --chunks 16 --blocks 2

Writes `--blocks` time blocks of 16 rows by `--chunks` chunks of 2^18 weights (a random
walk, like recorded weights) with the store writer, once per layout: one file per chunk
(format 1, and format 2 for small rows), and sharded with shards of a quarter and of all
of a block's chunks. Each layout runs in its own subprocess, so its peak RSS growth over
holding the rows is its own. Reads back with zarr and TensorStore and checks the bits.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ckpt_tools.store import HistoryWriter
from ckpt_tools.store.layout import PARAM_CHUNK
from ckpt_tools.tensors import TensorSpec


def _rows(n_rows: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    walk = np.empty((n_rows, width), np.float32)
    walk[0] = rng.standard_normal(width, dtype=np.float32) * np.float32(0.2)
    for i in range(1, n_rows):
        walk[i] = walk[i - 1] + np.float32(1e-3) * rng.standard_normal(width, dtype=np.float32)
    return walk


def one_case(store: Path, chunks: int, blocks: int, per_shard: int) -> dict:
    """Write and read one layout in this process; return its figures."""
    import tensorstore as ts
    import zarr

    import ckpt_tools.store.layout as layout

    width = chunks * PARAM_CHUNK
    rows = _rows(16 * blocks, width)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if per_shard == 1:
        layout.SHARD_AFTER = chunks  # never sharded
    writer = HistoryWriter.create(
        store, "train", steps=list(range(16 * blocks)),
        params=[TensorSpec("w", (width,), 0, "float32", True)], buffers=[],
        attrs={"config": {}}, root_attrs={}, shard_bytes=16 * per_shard * PARAM_CHUNK * 4,
    )
    start = time.perf_counter()
    for b in range(blocks):
        writer.write_rows(16 * b, rows[16 * b:16 * b + 16], np.empty((16, 0), np.float32))
    write_s = time.perf_counter() - start
    writer.close()
    extra_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    folder = store / "train" / "params"
    start = time.perf_counter()
    ours = zarr.open_array(str(folder), mode="r")[...]
    zarr_s = time.perf_counter() - start
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder)}}
    start = time.perf_counter()
    theirs = ts.open(spec).result().read().result()
    ts_s = time.perf_counter() - start
    same = (np.array_equal(ours.view(np.uint32), rows.view(np.uint32))
            and np.array_equal(theirs.view(np.uint32), rows.view(np.uint32)))
    files = sum(1 for f in (folder / "c").rglob("*") if f.is_file())
    stored = sum(f.stat().st_size for f in (folder / "c").rglob("*") if f.is_file())
    return {"files_per_block": files / blocks, "write_gbs": rows.nbytes / write_s / 1e9,
            "zarr_read_gbs": rows.nbytes / zarr_s / 1e9, "ts_read_gbs": rows.nbytes / ts_s / 1e9,
            "extra_rss_mib": extra_rss / 1024, "block_mib": rows[:16].nbytes / 2**20,
            "ratio": stored / rows.nbytes, "bit_for_bit": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16, help="chunks of 2^18 weights per row")
    ap.add_argument("--blocks", type=int, default=2, help="time blocks of 16 rows")
    ap.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(one_case(args.store, args.chunks, args.blocks, args.case)))
        return 0
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="shards_"))
    print(f"{args.blocks} blocks of 16 rows x {args.chunks * PARAM_CHUNK:,} float32 "
          f"({16 * args.chunks} MiB raw per block); blosc LZ4, time-major")
    print("| layout | files per block | write GB/s | zarr read GB/s | TensorStore read GB/s "
          "| peak RSS growth while writing (MiB) | stored/raw | bit for bit |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for per_shard, label in ((1, "one file per chunk"),
                             (max(args.chunks // 4, 2), "shards of a quarter block"),
                             (args.chunks, "one shard per block")):
        store = work / f"s{per_shard}.zarr"
        done = subprocess.run([sys.executable, __file__, "--case", str(per_shard), "--store",
                               str(store), "--chunks", str(args.chunks), "--blocks",
                               str(args.blocks)], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        ok = ok and r["bit_for_bit"]
        print(f"| {label} | {r['files_per_block']:.0f} | {r['write_gbs']:.3f} | "
              f"{r['zarr_read_gbs']:.3f} | {r['ts_read_gbs']:.3f} | {r['extra_rss_mib']:.0f} | "
              f"{r['ratio']:.3f} | {r['bit_for_bit']} |")
        shutil.rmtree(store)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
