"""Two-dimensional toy distributions (checkerboard, two moons, circle) for fast CPU experiments."""
from __future__ import annotations

import math

import torch

from genflow.data.base import GenerativeDataModule
from genflow.errors import config_error

SHAPES = ("checkerboard", "moons", "circle")


def sample_toy2d(shape: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` points of a 2-D toy distribution, roughly within [-1, 1]^2 (unit-scale coordinates)."""
    g = generator
    if shape == "checkerboard":
        # 4x4 board on [-1, 1]^2, mass on the cells whose row+column index is even
        u = torch.rand(n, 2, generator=g) * 2 - 1
        col = torch.floor((u[:, 0] + 1) * 2)
        row = torch.floor((u[:, 1] + 1) * 2)
        shift = ((row + col) % 2 == 1).float()
        x0 = u[:, 0] + shift * 0.5
        x0 = torch.where(x0 > 1, x0 - 2, x0)
        return torch.stack([x0, u[:, 1]], dim=1)
    if shape == "moons":
        t = torch.rand(n, generator=g) * math.pi
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 0.8
        return pts + 0.04 * torch.randn(n, 2, generator=g)
    if shape == "circle":
        t = torch.rand(n, generator=g) * 2 * math.pi
        return torch.stack([torch.cos(t), torch.sin(t)], dim=1) * 0.8 + 0.02 * torch.randn(n, 2, generator=g)
    raise config_error(f"unknown toy2d shape {shape!r}", "only a few 2-D shapes are built in",
                       f"use data.shape=one of {', '.join(SHAPES)}")


class Toy2D(GenerativeDataModule):
    feature_extractor = "none"
    name = "toy2d"

    def __init__(self, shape: str = "checkerboard", n: int = 20000, **kwargs):
        super().__init__(**kwargs)
        if shape not in SHAPES:
            raise config_error(f"unknown toy2d shape {shape!r}", "only a few 2-D shapes are built in",
                               f"use data.shape=one of {', '.join(SHAPES)}")
        self.shape, self.n = shape, n

    def examples(self) -> int:
        return int(self.n)

    def _load(self):
        return sample_toy2d(self.shape, self.n, torch.Generator().manual_seed(self.seed)), None
