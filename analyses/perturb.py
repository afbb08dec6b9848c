"""Public path of the ablations (`ckpt_tools.analyses.perturb.permute`, `ABLATIONS`, ...).

They live in `ckpt_tools.analyses.experiments.perturb`; this module re-exports them.
"""

from ckpt_tools.analyses.experiments.perturb import *  # noqa: F403
from ckpt_tools.analyses.experiments.perturb import __all__  # noqa: F401
