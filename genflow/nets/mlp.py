"""MLP backbone for vector data (B, d): toy 2-D densities, manifold experiments, likelihood tests.

x -> Linear -> ``num_blocks`` residual blocks -> LayerNorm-SiLU-Linear -> (B, d).
Each block: h + W2 SiLU(W1 SiLU(LN(h)) + A emb), where emb is the noise-label embedding
(sinusoidal, then a two-layer SiLU MLP) plus, if ``num_classes > 0``, a class embedding
(dropped per sample with probability ``label_dropout`` in training mode, for classifier-free guidance).
The last layer of each block and the output layer start near zero, so the untrained net is
close to the zero function and every block starts as the identity.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genflow.errors import config_error
from genflow.nets.layers import Linear, PositionalEmbedding


class _ResBlock(nn.Module):
    def __init__(self, hidden: int, emb: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc0 = Linear(hidden, hidden)
        self.affine = Linear(emb, hidden)
        self.fc1 = Linear(hidden, hidden, init_gain=1e-5)
        self.dropout = dropout

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = F.silu(self.fc0(F.silu(self.norm(h))) + self.affine(emb))
        return h + self.fc1(F.dropout(y, p=self.dropout, training=self.training))


class MLP(nn.Module):
    """Residual MLP; call ``net(x, noise_label, cond=None)`` with x (B, d), noise_label (B,)."""

    def __init__(
        self,
        *,
        data_shape: Sequence[int],
        num_classes: int = 0,
        hidden: int = 256,
        num_blocks: int = 4,
        emb_channels: int = 128,
        dropout: float = 0.0,
        label_dropout: float = 0.0,
        max_positions: int = 10000,
    ):
        super().__init__()
        if len(data_shape) != 1:
            raise config_error(f"MLP got data_shape={tuple(data_shape)}", "MLP works on vectors (d,)",
                               "use net=unet_* for images (C, H, W)")
        if not 0.0 <= label_dropout < 1.0:
            raise config_error(f"label_dropout={label_dropout}", "it is a probability", "use a value in [0, 1)")
        self.data_shape = (int(data_shape[0]),)
        self.num_classes = int(num_classes)
        self.label_dropout = float(label_dropout)
        d = self.data_shape[0]
        self.map_noise = PositionalEmbedding(emb_channels, max_positions=max_positions, endpoint=True)
        self.map_label = Linear(self.num_classes, emb_channels) if self.num_classes else None
        self.map_layer0 = Linear(emb_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.inp = Linear(d, hidden)
        self.blocks = nn.ModuleList(_ResBlock(hidden, emb_channels, dropout) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = Linear(hidden, d, init_gain=1e-5)

    def forward(self, x: Tensor, noise_label: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        b = x.shape[0]
        if x.shape[1:] != self.data_shape:
            raise ValueError(f"MLP built for data_shape {self.data_shape}, got input {tuple(x.shape)}")
        noise_label = noise_label.to(x.dtype)
        if noise_label.ndim == 0:
            noise_label = noise_label.expand(b)
        emb = self.map_noise(noise_label)
        if self.map_label is not None:
            labels = (cond or {}).get("class")
            if labels is None:
                labels = x.new_zeros(b, self.num_classes)
            labels = labels.to(x.dtype)
            if self.training and self.label_dropout:
                labels = labels * (torch.rand(b, 1, device=x.device) >= self.label_dropout).to(x.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.num_classes))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))
