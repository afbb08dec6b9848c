"""Write the reference results that tests/test_reference.py compares today's analyses to.

Run once with the implementation being replaced (the numpy telemetry of commit a626803):
``python tests/data/make_reference.py``. It records synthetic histories (deterministic:
seeded random walks written by the store writer) and stores their telemetry as netCDF.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ckpt_tools.analyses import telemetry
from ckpt_tools.synthetic import synthetic_specs, write_synthetic_history

HERE = Path(__file__).parent
CASES = {  # name: (n_steps, n_params, layer_size): layers straddle the 2**18 chunk edge
    "walk": (37, 300_000, 1 << 15),
}


def history(folder: Path, name: str) -> Path:
    """The synthetic store of case `name`, written into `folder`."""
    n_steps, n_params, layer_size = CASES[name]
    specs = synthetic_specs(n_params, layer_size=layer_size)
    return write_synthetic_history(folder / f"{name}.zarr", n_steps=n_steps, specs=specs,
                                   seed=3, step_size=2e-2)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            path = history(Path(tmp), name)
            for weights in ("all", "prunable"):
                result = telemetry.compute(path, weights=weights)
                result.attrs = {}
                result.to_netcdf(HERE / f"telemetry-{name}-{weights}.nc", engine="scipy")


if __name__ == "__main__":
    main()
