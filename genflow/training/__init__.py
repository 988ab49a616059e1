"""Lightning glue: the GenerativeModule and callbacks (EMA, sample grids, atomic checkpoints)."""
from genflow.training.callbacks import AtomicCheckpointIO, EDMEma, SampleGrid
from genflow.training.fid import FIDCallback
from genflow.training.module import GenerativeModule, check_finite_weights

__all__ = ["GenerativeModule", "check_finite_weights", "EDMEma", "SampleGrid", "AtomicCheckpointIO", "FIDCallback"]
