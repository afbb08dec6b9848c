"""Public path of the pruning primitives (`ckpt_tools.analyses.imp.prune`, masks, levels).

They live in `ckpt_tools.analyses.experiments.pruning`; this module re-exports them.
"""

from ckpt_tools.analyses.experiments.pruning import *  # noqa: F403
from ckpt_tools.analyses.experiments.pruning import __all__  # noqa: F401
