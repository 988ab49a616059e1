"""genflow: continuous-time generative models on PyTorch Lightning."""
import os

# OpenMP reads its spin count when torch loads: idle threads spin briefly, then sleep, so a busy machine
# costs at most its fair share (genflow.threads). Set before any entry point imports torch.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"
