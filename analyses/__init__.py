"""Analyses of recorded histories and the experiments that train from them.

Importing this package registers the ``ds.ckpt`` xarray accessor
(`ckpt_tools.analyses.accessor`); the analyses that ``ckpt analyze`` runs are listed in
`ckpt_tools.analyses.registry`.
"""

from ckpt_tools.analyses import accessor as _accessor  # noqa: F401  (registers ds.ckpt)
