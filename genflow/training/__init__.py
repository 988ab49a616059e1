"""Lightning glue: the GenerativeModule and callbacks (EMA, post-hoc EMA, sample grids, atomic checkpoints)."""
from genflow.training.callbacks import AtomicCheckpointIO, EDMEma, SampleGrid
from genflow.training.fid import FIDCallback
from genflow.training.module import GenerativeModule, check_finite_weights
from genflow.training.posthoc import PowerEma

__all__ = ["GenerativeModule", "check_finite_weights", "EDMEma", "PowerEma", "SampleGrid", "AtomicCheckpointIO", "FIDCallback"]
