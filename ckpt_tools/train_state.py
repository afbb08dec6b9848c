"""Former home of the resume-state helpers; they live in `ckpt_tools.resume`."""

from ckpt_tools.resume import StopOnSignal, TrainingInterrupted, capture, restore

__all__ = ["StopOnSignal", "TrainingInterrupted", "capture", "restore"]
