"""Recording to object storage and analysing from it, next to local disk, in one run.

Starts moto's S3 server on 127.0.0.1 at a free port (the test suite's server; or give
--endpoint with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY set for a real one), then, for a
local folder and for ``s3://``, measures:

  record     `Recorder` writing --steps checkpoints of a stack of linear layers of about
             --params weights (weights on a random walk, so they compress like recorded
             ones), from creating the store to `close` returning (every row written and
             committed, metadata consolidated); MB/s of raw float32;
  telemetry  `ckpt_tools.analyses.telemetry.compute` (every variable) over the stored
             history, read back from the same store; MB/s of raw float32 `params` read.

The training loop does no work between `record` calls, so this is the recording path's
own throughput. Each figure is the best of --repeats; the ratio s3/local is printed.

Usage: python bench/object_store.py [--params 1000000] [--steps 64] [--repeats 2]
                                    [--endpoint URL] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import torch
from torch import nn

import ckpt_tools
from ckpt_tools import Recorder
from ckpt_tools.analyses import telemetry
from ckpt_tools.store import as_location


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=sink, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto's server did not start")


def model_of(n_params: int) -> nn.Module:
    width = 1000
    layers = max(1, round(n_params / (width * width + width)))
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def record(where, model: nn.Module, steps: int) -> float:
    noise = [[torch.randn_like(p) * 1e-3 for p in model.parameters()] for _ in range(4)]
    start = time.perf_counter()
    with Recorder(where, model, list(range(steps)), overwrite=True) as rec:
        for step in range(steps):
            if step:
                with torch.no_grad():
                    for p, d in zip(model.parameters(), noise[step % 4], strict=True):
                        p.add_(d)
            rec.record(step)
    return time.perf_counter() - start


def analyse(where) -> float:
    history = ckpt_tools.open_history(where)
    start = time.perf_counter()
    telemetry.compute(history)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of moto's server")
    parser.add_argument("--bucket", default="ckpt-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="objstore-bench-"))
    proc = None
    if args.endpoint:
        options = {"endpoint_url": args.endpoint}
    else:
        proc, endpoint = start_moto(tmp / "moto.log")
        options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
    try:
        import s3fs

        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        if not fs.exists(args.bucket):
            fs.mkdir(args.bucket)
        model = model_of(args.params)
        n_params = sum(p.numel() for p in model.parameters())
        raw_mb = n_params * 4 * args.steps / 1e6
        stores = {
            "local": tmp / "run.zarr",
            "s3": as_location(f"s3://{args.bucket}/{uuid.uuid4().hex[:8]}/run.zarr", options),
        }
        figures = {}
        for name, where in stores.items():
            t_rec = min(record(where, model_of(args.params), args.steps)
                        for _ in range(args.repeats))
            t_tel = min(analyse(where) for _ in range(args.repeats))
            figures[name] = {"record_s": t_rec, "record_mb_s": raw_mb / t_rec,
                             "telemetry_s": t_tel, "telemetry_mb_s": raw_mb / t_tel}
        a, b = ckpt_tools.open_history(stores["local"]), ckpt_tools.open_history(stores["s3"])
        same = bool((a["params"].values == b["params"].values).all())
        load = os.getloadavg()
        print(f"{n_params:,} weights x {args.steps} steps = {raw_mb:.0f} MB raw float32; "
              f"torch threads {torch.get_num_threads()}; load average {load[0]:.1f}")
        for name, f in figures.items():
            print(f"{name:>5}: record {f['record_mb_s']:7.1f} MB/s ({f['record_s']:.2f} s)   "
                  f"telemetry {f['telemetry_mb_s']:7.1f} MB/s ({f['telemetry_s']:.2f} s)")
        ratio_rec = figures["s3"]["record_mb_s"] / figures["local"]["record_mb_s"]
        ratio_tel = figures["s3"]["telemetry_mb_s"] / figures["local"]["telemetry_mb_s"]
        print(f"s3/local: record {ratio_rec:.2f}x, telemetry {ratio_tel:.2f}x; "
              f"stored params identical: {same}")
        if args.json:
            args.json.write_text(json.dumps({
                "params": n_params, "steps": args.steps, "raw_mb": raw_mb, "load": load,
                "figures": figures, "identical": same,
                "server": "moto" if proc else args.endpoint}, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
