"""Run the study of Frankle, Schwab & Morcos (2020) end to end: `ckpt study` in Python.

Usage: python examples/03_reproduce_early_phase.py OUT_DIR [SIZE]
(SIZE: smoke, the default, fashion-mnist, gpu or cifar10; see docs/reproduction.md.)
"""

import sys

from ckpt_tools.analyses.experiments.study import run_study

run_study(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "smoke")  # prints the summary
