"""Datamodules: digits (embedded default), toy2d, cifar10, imagefolder, zip (EDM's archives; archive.py)
(+ circle, multiview)."""
from genflow.data.base import GenerativeDataModule
from genflow.data.images import CIFAR10, Digits, ImageFolder
from genflow.data.toy import Toy2D, sample_toy2d

__all__ = ["GenerativeDataModule", "Digits", "CIFAR10", "ImageFolder", "Toy2D", "sample_toy2d"]
