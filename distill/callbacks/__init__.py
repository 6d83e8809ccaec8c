"""Lightning callbacks and loggers: checkpoints and preemption, monitors that observe, the CSV logger."""

from distill.callbacks.checkpoints import (CKPT_PREFIX, AtomicCheckpointIO, StopOnSignal, StepCheckpoint,
                                           checkpoint_path, find_resume_checkpoint, list_checkpoints)
from distill.callbacks.csv_logger import CSVLogger
from distill.callbacks.monitors import (FIDMonitor, FlushMetrics, GradientVariance, ProposalPlot, SampleGrid,
                                        StepProgressBar, StepTimer)

__all__ = ["CKPT_PREFIX", "AtomicCheckpointIO", "StopOnSignal", "StepCheckpoint", "checkpoint_path",
           "find_resume_checkpoint", "list_checkpoints", "CSVLogger", "FIDMonitor", "FlushMetrics",
           "GradientVariance", "ProposalPlot", "SampleGrid", "StepProgressBar", "StepTimer"]
