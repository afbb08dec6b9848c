"""Experiments that train from a recorded history.

IMP with rewinding, ablations, pre-training, instability, and the study that runs them
together: each is one module; `docs/experiments.md` describes them and their groups.
"""
