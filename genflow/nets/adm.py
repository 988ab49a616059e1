"""ADMUNet: the ablated diffusion model's UNet (Dhariwal & Nichol 2021) in EDM's configuration (``DhariwalUNet``).

EDM trains it on ImageNet-64 (preset ``adm_imagenet64``: 192 channels, multipliers 1, 2, 3, 4, three
blocks per level, attention at 32, 16 and 8, dropout 0.10, 1000 classes; 295.9 M parameters). Against
genflow's ``UNet`` (DDPM++/NCSN++) it differs in:

- noise embedding: sinusoids [cos, sin] of the noise label (no endpoint), plus the augmentation label,
  through two linear layers; the class label is added after the second one (no sqrt(K) scaling);
- blocks: adaptive group-norm scale/shift, group-norm eps 1e-5, no 1/sqrt(2) skip scaling, resampling
  skips without a projection, one attention head per 64 channels, attention in every decoder block at
  an attention resolution;
- the level-0 convolution outputs ``model_channels * channel_mult[0]`` channels; the output is
  GroupNorm-SiLU-conv after the last decoder block.

Initialisation follows ADM's (Kaiming-uniform weights scaled by sqrt(1/3), zero-initialised output
layers) except that biases start at zero. ``genflow.apps.convert`` maps EDM's ``DhariwalUNet`` pickles onto it.

Call: ``net(x, noise_label, cond=None)`` like every genflow net.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genflow.errors import config_error
from genflow.nets import presets
from genflow.nets.layers import (Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, batch_noise_labels,
                                 check_levels, class_labels)

#: name -> hyperparameters (EDM train.py --arch=adm for ImageNet-64)
PRESETS: dict[str, dict[str, Any]] = {
    "adm_imagenet64": dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                           attn_resolutions=(32, 16, 8), dropout=0.10, augment_dim=0),
}

_DEFAULTS: dict[str, Any] = dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0, augment_dim=0,
                                 channels_per_head=64)
#: ADM's initialisation: Kaiming-uniform weights scaled by sqrt(1/3)
_INIT = dict(init_mode="kaiming_uniform", init_gain=math.sqrt(1 / 3))


def resolve_hparams(preset: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """ADMUNet's defaults <- preset <- explicit overrides (None means "not given")."""
    return presets.resolve_hparams("ADMUNet", _DEFAULTS, PRESETS, preset, overrides)


class ADMUNet(nn.Module):
    """ADM UNet (see the module docstring). Keyword-only constructor like ``UNet``."""

    def __init__(self, *, data_shape: Sequence[int], num_classes: int = 0, preset: str | None = None, **hparams: Any):
        super().__init__()
        if len(data_shape) != 3:
            raise config_error(f"ADMUNet got data_shape={tuple(data_shape)}", "ADMUNet works on images (C, H, W)",
                               "use net=mlp for vector data")
        hp = resolve_hparams(preset, hparams)
        self.hparams, self.preset = hp, preset
        c_in, height, width = (int(s) for s in data_shape)
        self.data_shape = (c_in, height, width)
        self.num_classes = int(num_classes)
        mc, mult = int(hp["model_channels"]), [int(m) for m in hp["channel_mult"]]
        attn_res = {int(r) for r in hp["attn_resolutions"]}
        check_levels(height, width, len(mult), attn_res)
        if not 0.0 <= float(hp["label_dropout"]) < 1.0:
            raise config_error(f"label_dropout={hp['label_dropout']}", "it is a probability of dropping the class",
                               "use a value in [0, 1)")
        self.label_dropout = float(hp["label_dropout"])
        self.augment_dim = int(hp["augment_dim"])
        emb_ch = mc * int(hp["channel_mult_emb"])
        block_kw = dict(emb_channels=emb_ch, channels_per_head=int(hp["channels_per_head"]),
                        dropout=float(hp["dropout"]), skip_scale=1.0, eps=1e-5, resample_proj=False,
                        adaptive_scale=True, init_mode=_INIT["init_mode"])

        self.map_noise = PositionalEmbedding(mc)
        self.map_augment = Linear(self.augment_dim, mc, bias=False, **_INIT) if self.augment_dim else None
        self.map_layer0 = Linear(mc, emb_ch, **_INIT)
        self.map_layer1 = Linear(emb_ch, emb_ch, **_INIT)
        self.map_label = (Linear(self.num_classes, emb_ch, bias=False, init_mode="kaiming_normal",
                                 init_gain=math.sqrt(self.num_classes)) if self.num_classes else None)

        self.enc = nn.ModuleList()
        cout = c_in
        skips: list[int] = []
        for level, m in enumerate(mult):
            res = height >> level
            if level == 0:
                self.enc.append(Conv2d(cout, mc * m, 3, **_INIT))
                cout = mc * m
            else:
                self.enc.append(UNetBlock(cout, cout, down=True, **block_kw))
            skips.append(cout)
            for _ in range(int(hp["num_blocks"])):
                self.enc.append(UNetBlock(cout, mc * m, attention=res in attn_res, **block_kw))
                cout = mc * m
                skips.append(cout)

        self.dec = nn.ModuleList()
        self._dec_cat: list[bool] = []
        for level in reversed(range(len(mult))):
            res = height >> level
            if level == len(mult) - 1:
                self.dec.append(UNetBlock(cout, cout, attention=True, **block_kw))
                self.dec.append(UNetBlock(cout, cout, **block_kw))
                self._dec_cat += [False, False]
            else:
                self.dec.append(UNetBlock(cout, cout, up=True, **block_kw))
                self._dec_cat.append(False)
            for _ in range(int(hp["num_blocks"]) + 1):
                cin = cout + skips.pop()
                cout = mc * mult[level]
                self.dec.append(UNetBlock(cin, cout, attention=res in attn_res, **block_kw))
                self._dec_cat.append(True)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, c_in, 3, init_mode=_INIT["init_mode"], init_gain=0.0)

    def embed(self, noise_label: Tensor, cond: Mapping[str, Tensor] | None, batch: int, like: Tensor) -> Tensor:
        noise_label = batch_noise_labels(noise_label, batch, like)
        cond = cond or {}
        emb = self.map_noise(noise_label)
        if self.map_augment is not None:
            aug = cond.get("augment")
            aug = like.new_zeros(batch, self.augment_dim) if aug is None else aug.to(like.dtype)
            emb = emb + self.map_augment(aug)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels(cond, batch, self.num_classes, like, dropout=self.label_dropout,
                                  training=self.training)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x: Tensor, noise_label: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        if x.shape[1:] != self.data_shape:
            raise ValueError(f"ADMUNet built for data_shape {self.data_shape}, got input {tuple(x.shape)}")
        emb = self.embed(noise_label, cond, x.shape[0], x)
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x) if i == 0 else block(x, emb)
            skips.append(x)
        for cat, block in zip(self._dec_cat, self.dec):
            if cat:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x))).contiguous()
