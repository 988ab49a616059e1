"""genflow: continuous-time generative models on PyTorch Lightning."""
import os

# OpenMP reads its wait policy when torch loads: idle threads sleep instead of spinning, so a busy machine
# costs at most its fair share (genflow.threads). Set before any entry point imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
