"""Telemetry of a history several times larger than the memory it may use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from ckpt_tools.synthetic import write_synthetic_history

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
