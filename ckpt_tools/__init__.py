"""ckpt-tools: dense early-phase checkpoints in Zarr, analysed with xarray.

Public surface::

    Schedule                      when to record (text form, presets, JSON)
    Recorder                      record any PyTorch loop into a store
    open_store(path)              the whole store as a lazy xarray.DataTree
    open_history(path, group)     one recorded history as a lazy xarray.Dataset
    load_state_dict(path, step)   the stored weights of a step, for rewinding
    StoreError                    one-line errors about stores
"""

from ckpt_tools.api import load_state_dict, open_history, open_store
from ckpt_tools.provenance import version as _version
from ckpt_tools.recorder import Recorder
from ckpt_tools.schedule import PRESETS, Schedule
from ckpt_tools.store import StoreError

__version__ = _version()

__all__ = [
    "PRESETS",
    "Recorder",
    "Schedule",
    "StoreError",
    "__version__",
    "load_state_dict",
    "open_history",
    "open_store",
]
