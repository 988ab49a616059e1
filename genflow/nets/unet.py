"""UNet: the DDPM++ / NCSN++ family (Song et al. 2021) in the configuration EDM and PFGM++ train.

Architecture (per level l = 0..L-1 at resolution H / 2^l, channels model_channels * channel_mult[l]):
encoder = input conv, then per level a down block (l > 0) and ``num_blocks`` residual blocks;
decoder = two middle blocks (the first with attention), then per level an up block (l < L-1) and
``num_blocks + 1`` blocks fed with the concatenated encoder skips; output GN-SiLU-conv at full size.
Blocks at resolutions in ``attn_resolutions`` end with self-attention (in the decoder: the last
block of the level). Noise level -> embedding (positional for DDPM++, Fourier for NCSN++), plus
class and augmentation labels -> two-layer MLP -> per-block injection.

Presets ``ddpmpp_cifar10``, ``ncsnpp_cifar10`` and ``ddpmpp_ffhq64`` reproduce the parameter
counts of EDM's SongUNet exactly (55.73 M, 56.40 M, 61.81 M with the 9-dim augmentation label).
Small presets serve tests and CPU training: ``unet_tiny`` (8x8), ``unet_digits`` (8x8, the main
job's network) and ``unet_small`` (32x32).

Call: ``net(x, noise_label, cond=None)`` with x (B, C, H, W), noise_label (B,), cond an optional
dict with ``"class"`` one-hot (B, K) and ``"augment"`` (B, augment_dim).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genflow.errors import config_error
from genflow.nets import presets
from genflow.nets.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock,
                                 batch_noise_labels, check_levels, class_labels)

_DDPMPP = dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard", resample_filter=(1, 1))
_NCSNPP = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1))

#: name -> hyperparameters. The paper presets follow EDM's train.py (--arch ddpmpp / ncsnpp, --cres).
PRESETS: dict[str, dict[str, Any]] = {
    "ddpmpp_cifar10": dict(_DDPMPP, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                           dropout=0.13, augment_dim=9),
    "ncsnpp_cifar10": dict(_NCSNPP, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                           dropout=0.13, augment_dim=9),
    "ddpmpp_ffhq64": dict(_DDPMPP, model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                          dropout=0.05, augment_dim=9),
    "unet_tiny": dict(_DDPMPP, model_channels=16, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
                      attn_resolutions=(4,), dropout=0.0, adaptive_scale=True),
    # Sized for the main job: 3000 steps of batch 128 in about 4 minutes on 2 CPU cores (0.73 M params).
    "unet_digits": dict(_DDPMPP, model_channels=32, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
                        attn_resolutions=(4,), dropout=0.0, adaptive_scale=True),
    "unet_small": dict(_DDPMPP, model_channels=64, channel_mult=(1, 2, 2), channel_mult_emb=4, num_blocks=2,
                       attn_resolutions=(16,), dropout=0.1, adaptive_scale=True),
}

_DEFAULTS: dict[str, Any] = dict(
    model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,),
    dropout=0.10, label_dropout=0.0, augment_dim=0, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=(1, 1), fourier_scale=16.0, num_heads=1,
    adaptive_scale=False, channels_last=False,
)


def resolve_hparams(preset: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """UNet's defaults <- preset <- explicit overrides (None means "not given")."""
    return presets.resolve_hparams("UNet", _DEFAULTS, PRESETS, preset, overrides)


class UNet(nn.Module):
    """DDPM++/NCSN++ UNet (see the module docstring). Keyword-only constructor.

    ``data_shape=(C, H, W)`` and ``num_classes`` come from the datamodule; ``preset`` picks a named
    architecture and any other keyword overrides one of its hyperparameters.
    """

    def __init__(self, *, data_shape: Sequence[int], num_classes: int = 0, preset: str | None = None, **hparams: Any):
        super().__init__()
        if len(data_shape) != 3:
            raise config_error(f"UNet got data_shape={tuple(data_shape)}", "UNet works on images (C, H, W)",
                               "use net=mlp for vector data, or a multiview net for (V, C, H, W)")
        hp = resolve_hparams(preset, hparams)
        self.hparams = hp
        self.preset = preset
        c_in, height, width = (int(s) for s in data_shape)
        self.data_shape = (c_in, height, width)
        self.num_classes = int(num_classes)
        mc = int(hp["model_channels"])
        mult = [int(m) for m in hp["channel_mult"]]
        levels = len(mult)
        attn_res = {int(r) for r in hp["attn_resolutions"]}
        check_levels(height, width, levels, attn_res)
        if hp["embedding_type"] not in ("positional", "fourier"):
            raise config_error(f"embedding_type={hp['embedding_type']!r}", "two noise embeddings exist",
                               "use 'positional' (DDPM++) or 'fourier' (NCSN++)")
        if hp["encoder_type"] not in ("standard", "skip", "residual"):
            raise config_error(f"encoder_type={hp['encoder_type']!r}", "unknown encoder",
                               "use 'standard' (DDPM++), 'residual' (NCSN++) or 'skip'")
        if hp["decoder_type"] not in ("standard", "skip"):
            raise config_error(f"decoder_type={hp['decoder_type']!r}", "unknown decoder", "use 'standard' or 'skip'")
        if not 0.0 <= float(hp["label_dropout"]) < 1.0:
            raise config_error(f"label_dropout={hp['label_dropout']}", "it is a probability of dropping the class",
                               "use a value in [0, 1), e.g. 0.1 for classifier-free guidance")
        self.label_dropout = float(hp["label_dropout"])
        # NHWC activations (oneDNN's native layout). Measured on a 2-core CPU it made no difference
        # to a training step, so it is off by default; the output is NCHW either way.
        self.channels_last = bool(hp["channels_last"])
        self.augment_dim = int(hp["augment_dim"])
        self.encoder_type, self.decoder_type = hp["encoder_type"], hp["decoder_type"]
        resample_filter = tuple(int(v) for v in hp["resample_filter"])

        emb_ch = mc * int(hp["channel_mult_emb"])
        noise_ch = mc * int(hp["channel_mult_noise"])
        block_kw = dict(emb_channels=emb_ch, num_heads=int(hp["num_heads"]), dropout=float(hp["dropout"]),
                        skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                        adaptive_scale=bool(hp["adaptive_scale"]))

        # Mapping network. DDPM++ consumes its sinusoids as [sin, cos] (flip=True).
        if hp["embedding_type"] == "positional":
            self.map_noise = PositionalEmbedding(noise_ch, endpoint=True, flip=True)
        else:
            self.map_noise = FourierEmbedding(noise_ch, scale=float(hp["fourier_scale"]), flip=True)
        self.map_label = Linear(self.num_classes, noise_ch) if self.num_classes else None
        self.map_augment = Linear(self.augment_dim, noise_ch, bias=False) if self.augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb_ch)
        self.map_layer1 = Linear(emb_ch, emb_ch)

        # Encoder: a flat list of (kind, module); kinds: "conv", "block", "aux_down", "aux_skip", "aux_res".
        self.enc = nn.ModuleList()
        self._enc_kinds: list[str] = []

        def add_enc(kind: str, module: nn.Module) -> None:
            self.enc.append(module)
            self._enc_kinds.append(kind)

        cout, caux = c_in, c_in
        skips: list[int] = []
        for level, m in enumerate(mult):
            res = height >> level
            if level == 0:
                add_enc("conv", Conv2d(cout, mc, 3))
                cout = mc
                skips.append(cout)
            else:
                add_enc("block", UNetBlock(cout, cout, down=True, **block_kw))
                skips.append(cout)
                if self.encoder_type == "skip":
                    add_enc("aux_down", Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter))
                    add_enc("aux_skip", Conv2d(caux, cout, 1))
                elif self.encoder_type == "residual":
                    add_enc("aux_res", Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter, fused_down=True))
                    caux = cout
            for _ in range(int(hp["num_blocks"])):
                add_enc("block", UNetBlock(cout, mc * m, attention=res in attn_res, **block_kw))
                cout = mc * m
                skips.append(cout)

        # Decoder: kinds "block" (consumes a skip if its input is wider), "aux_up", "out".
        self.dec = nn.ModuleList()
        self._dec_kinds: list[str] = []
        self._dec_cat: list[bool] = []

        def add_dec(kind: str, module: nn.Module, cat: bool = False) -> None:
            self.dec.append(module)
            self._dec_kinds.append(kind)
            self._dec_cat.append(cat)

        for level in reversed(range(levels)):
            m = mult[level]
            res = height >> level
            if level == levels - 1:
                add_dec("block", UNetBlock(cout, cout, attention=True, **block_kw))
                add_dec("block", UNetBlock(cout, cout, **block_kw))
            else:
                add_dec("block", UNetBlock(cout, cout, up=True, **block_kw))
            for idx in range(int(hp["num_blocks"]) + 1):
                cin = cout + skips.pop()
                add_dec("block", UNetBlock(cin, mc * m, attention=(idx == int(hp["num_blocks"]) and res in attn_res),
                                           **block_kw), cat=True)
                cout = mc * m
            if self.decoder_type == "skip" or level == 0:
                if self.decoder_type == "skip" and level < levels - 1:
                    add_dec("aux_up", Conv2d(c_in, c_in, 0, up=True, resample_filter=resample_filter))
                add_dec("out", nn.Sequential(GroupNorm(cout, eps=1e-6), nn.SiLU(), Conv2d(cout, c_in, 3, init_gain=1e-5)))

    # ------------------------------------------------------------------------------------------
    def embed(self, noise_label: Tensor, cond: Mapping[str, Tensor] | None, batch: int, like: Tensor) -> Tensor:
        """Noise level (+ class, + augmentation label) -> embedding (B, emb_channels)."""
        noise_label = batch_noise_labels(noise_label, batch, like)
        emb = self.map_noise(noise_label)
        cond = cond or {}
        if self.map_label is not None:
            labels = class_labels(cond, batch, self.num_classes, like, dropout=self.label_dropout,
                                  training=self.training)
            # sqrt(K) makes a one-hot row unit-variance per input, like a standard-normal feature.
            emb = emb + self.map_label(labels * math.sqrt(self.num_classes))
        if self.map_augment is not None:
            aug = cond.get("augment")
            # Zeros when no augmentation pipe runs: same output as skipping the layer, but its weights
            # still take part in the graph (DDP needs every parameter to receive a gradient).
            aug = like.new_zeros(batch, self.augment_dim) if aug is None else aug.to(like.dtype)
            emb = emb + self.map_augment(aug)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: Tensor, noise_label: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        if x.shape[1:] != self.data_shape:
            raise ValueError(f"UNet built for data_shape {self.data_shape}, got input {tuple(x.shape)}")
        emb = self.embed(noise_label, cond, x.shape[0], x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        skips: list[Tensor] = []
        aux = x
        for kind, module in zip(self._enc_kinds, self.enc):
            if kind == "block":
                x = module(x, emb)
                skips.append(x)
            elif kind == "conv":
                x = module(x)
                skips.append(x)
            elif kind == "aux_down":
                aux = module(aux)
            elif kind == "aux_skip":
                x = skips[-1] = x + module(aux)
            else:  # aux_res: NCSN++'s progressive input branch, merged with variance-preserving 1/sqrt(2)
                x = skips[-1] = aux = (x + module(aux)) * math.sqrt(0.5)

        out = None
        for kind, cat, module in zip(self._dec_kinds, self._dec_cat, self.dec):
            if kind == "block":
                if cat:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
            elif kind == "aux_up":
                out = module(out)
            else:
                y = module(x)
                out = y if out is None else y + out
        return out.contiguous()
