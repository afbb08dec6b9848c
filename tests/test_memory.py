"""Telemetry of a history several times larger than the memory it may use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from ckpt_tools.synthetic import synthetic_specs, write_synthetic_history

BUDGET = 80 << 20  # bytes of peak RSS growth allowed while computing the telemetry
HISTORY = 4 * BUDGET  # raw float32 bytes of the synthetic history


def test_peak_memory_stays_within_budget(tmp_path):
    n_params = 1 << 16
    n_steps = -(-HISTORY // (4 * (n_params + 64)))  # rounded up
    path = write_synthetic_history(tmp_path / "big.zarr", n_steps=n_steps, n_params=n_params)
    script = textwrap.dedent(f"""
        import json, resource
        import ckpt_tools
        from ckpt_tools.analyses import telemetry

        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        history = ckpt_tools.open_history({str(path)!r})
        telemetry.compute(history.isel(step=slice(0, 32)))  # imports, thread pools
        before = peak()
        result = telemetry.compute(history)
        print(json.dumps({{"before": before, "after": peak(),
                           "raw": history["params"].nbytes,
                           "steps": result.sizes["step"]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=300)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["steps"] == n_steps
    assert m["raw"] >= 4 * BUDGET
    assert m["after"] - m["before"] < BUDGET, m


def test_memory_held_per_chunk_does_not_grow_with_the_history(tmp_path):
    # The fused pass over 16 and 64 rows of chunks (one column of 16 steps x 16,448
    # weights each; boundary rows: 131 kB per chunk), traced by tracemalloc on dask's
    # synchronous scheduler, so the order of the tasks and the figures are reproducible.
    # Reduced in one computation, 57-63% of the chunks' boundary rows waited for their
    # neighbour's task, so the peak grew by 0.6 boundary rows per extra chunk; in windows
    # of 4 chunk rows it grows by the results alone (2.3 kB per chunk here).
    n = 16
    specs = synthetic_specs(1 << 14, layer_size=1 << 14)
    path = write_synthetic_history(tmp_path / "h.zarr", n_steps=16 * 4 * n, specs=specs)
    script = textwrap.dedent(f"""
        import json, tracemalloc
        import dask
        import numpy as np
        import ckpt_tools
        from ckpt_tools.analyses import _fused

        params = ckpt_tools.open_history({str(path)!r})["params"]
        width = params.shape[1]
        _fused._WINDOW_BYTES = 4 * 8 * width  # windows of 4 chunk rows
        bounds = np.array([0, {specs[0].stop}, width])

        def peak(rows):
            x = params.isel(step=slice(0, 16 * rows)).data
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            _fused.layer_sums(x, bounds, np.arange(3))
            return tracemalloc.get_traced_memory()[1] - base

        with dask.config.set(scheduler="sync"):
            tracemalloc.start()
            peak(4)  # first allocations: pooled chunk buffers, compiled kernel
            print(json.dumps({{"small": peak({n}), "large": peak({4 * n}),
                               "edges": 8 * width}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=300)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    per_chunk = (m["large"] - m["small"]) / (3 * n)
    assert per_chunk < 0.1 * m["edges"], m


def test_recording_stays_within_its_host_memory_budget(tmp_path):
    # 4M parameters (16 MB a row) recorded for 24 steps (384 MB raw) with a 160 MiB budget:
    # peak memory of the training process and its writers together (PSS) may grow by the
    # budget plus 10%.
    budget = 160 << 20
    bench = Path(__file__).resolve().parents[1] / "bench" / "record_scale.py"
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(bench), "--sizes", "4M", "--writers", "1",
                    "--host-memory", str(budget), "--steps", "24", "--no-baselines",
                    "--workdir", str(tmp_path), "--json", str(out)],
                   check=True, capture_output=True, timeout=600)
    (run,) = json.loads(out.read_text())
    assert run["steps"] * run["params"] * 4 > 2 * budget
    assert 1 < run["chunk_steps"] < 16
    assert 0 < run["growth"] <= 1.1 * budget, run
