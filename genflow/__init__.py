"""genflow: continuous-time generative models on PyTorch Lightning."""

__version__ = "0.1.0"
