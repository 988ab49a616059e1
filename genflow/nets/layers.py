"""Building blocks shared by genflow's backbones (UNet, MultiViewUNet).

Everything here is plain ``torch.nn``: no knowledge of methods, data or Lightning.

* ``Linear`` / ``Conv2d``: weights initialised like the DDPM++/NCSN++ family (Xavier-uniform, a tiny
  gain on layers that close a residual branch); ``Conv2d`` can also resample by 2 with an FIR filter
  ([1, 1] box or [1, 3, 3, 1] binomial), before the convolution or, for the "fused" down path, after it.
* ``GroupNorm``: 32 groups, at least 4 channels per group.
* ``Attention``: multi-head attention over tokens (B, L, C) through
  ``torch.nn.functional.scaled_dot_product_attention``; self-attention (optionally over extra
  key/value tokens) or cross-attention to a context (B, M, C_ctx).
* ``PositionalEmbedding`` / ``FourierEmbedding``: noise-level embeddings of DDPM++ and NCSN++.
* ``UNetBlock``: residual block with embedding injection (additive or adaptive scale/shift),
  dropout, optional up/down resampling, optional self-attention (over the tokens of several views
  when ``views > 1``) and optional cross-attention to a context.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genflow.errors import config_error

__all__ = [
    "init_weight_",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "Attention",
    "PositionalEmbedding",
    "FourierEmbedding",
    "UNetBlock",
    "downsample2d",
    "upsample2d",
]


def init_weight_(weight: Tensor, fan_in: int, fan_out: int, mode: str = "xavier_uniform", gain: float = 1.0) -> Tensor:
    """Initialise ``weight`` in place; ``gain`` multiplies the drawn values (1e-5 for "almost zero")."""
    with torch.no_grad():
        if mode == "xavier_uniform":
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            weight.uniform_(-bound, bound)
        elif mode == "xavier_normal":
            weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        elif mode == "kaiming_uniform":
            bound = math.sqrt(3.0 / fan_in)
            weight.uniform_(-bound, bound)
        elif mode == "kaiming_normal":
            weight.normal_(0.0, math.sqrt(1.0 / fan_in))
        else:
            raise ValueError(f"unknown init mode {mode!r}; use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal")
        weight.mul_(gain)
    return weight


class Linear(nn.Linear):
    """``nn.Linear`` with the family's initialisation (bias starts at zero)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "xavier_uniform", init_gain: float = 1.0):
        super().__init__(in_features, out_features, bias=bias)
        init_weight_(self.weight, in_features, out_features, init_mode, init_gain)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def _fir_kernel(taps: Sequence[float]) -> Tensor:
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def _is_box(taps: Sequence[float]) -> bool:
    return len(taps) == 2 and float(taps[0]) == float(taps[1])


def downsample2d(x: Tensor, kernel: Tensor | None, box: bool, pad: int | None = None) -> Tensor:
    """Halve H and W with a normalised 2-D FIR ``kernel`` (k, k) applied per channel.

    The box filter [1, 1] is a 2x2 average pool, which is what the general depthwise convolution
    computes in that case, only several times faster on CPU (forward and backward).
    """
    if box and pad in (None, 0):
        return F.avg_pool2d(x, 2)
    k = kernel.shape[-1]
    pad = (k - 1) // 2 if pad is None else pad
    c = x.shape[1]
    w = kernel.to(x.dtype).expand(c, 1, k, k)
    return F.conv2d(x, w, stride=2, padding=pad, groups=c)


def upsample2d(x: Tensor, kernel: Tensor | None, box: bool) -> Tensor:
    """Double H and W: zero-insertion followed by the FIR filter (gain 4), per channel.

    For the box filter that is nearest-neighbour repetition, computed as such (much cheaper).
    """
    if box:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    k = kernel.shape[-1]
    c = x.shape[1]
    w = (kernel * 4).to(x.dtype).expand(c, 1, k, k)
    return F.conv_transpose2d(x, w, stride=2, padding=(k - 1) // 2, groups=c)


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down resampling by an FIR filter.

    ``kernel=0`` means resampling only (no weights). By default the resampling happens before the
    convolution; ``fused_down=True`` convolves first (with extra padding) and filters/decimates after,
    the order NCSN++'s residual input branch uses. Fused *up*-sampling is not offered (the PFGM++
    code and EDM's disagree on it, and no preset needs it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[int] = (1, 1),
        fused_down: bool = False,
        init_mode: str = "xavier_uniform",
        init_gain: float = 1.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        if kernel == 0 and in_channels != out_channels:
            raise ValueError("Conv2d: kernel=0 (resampling only) needs in_channels == out_channels")
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.up, self.down, self.fused_down = up, down, fused_down and down and kernel > 0
        self.box = _is_box(resample_filter)
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            init_weight_(self.weight, in_channels * kernel * kernel, out_channels * kernel * kernel, init_mode, init_gain)
            self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # The filter is a constant of the architecture, not state: keep it out of checkpoints.
        self.register_buffer("resample_filter", _fir_kernel(resample_filter) if (up or down) else None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_down:
            f_pad = (self.resample_filter.shape[-1] - 1) // 2
            x = F.conv2d(x, self.weight, self.bias, padding=self.kernel // 2 + f_pad)
            return downsample2d(x, self.resample_filter, self.box, pad=0)
        if self.up:
            x = upsample2d(x, self.resample_filter, self.box)
        elif self.down:
            x = downsample2d(x, self.resample_filter, self.box)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.kernel // 2)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}, up={self.up}, down={self.down}"


class GroupNorm(nn.GroupNorm):
    """GroupNorm with min(num_groups, C // min_channels_per_group) groups, so narrow layers still work."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        while num_channels % groups:
            groups -= 1
        super().__init__(groups, num_channels, eps=eps)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention over tokens.

    Self-attention (``context_channels=None``): ``forward(x)`` with x (B, L, C); ``extra`` tokens
    (B, M, C), if given, join the keys and values only (e.g. the tokens of a clean reference view).
    Cross-attention (``context_channels=C_ctx``): queries from x, keys/values from ``context`` (B, M, C_ctx).
    The output projection starts near zero so a new attention layer begins as the identity branch.
    ``mask``, if given, is passed to ``scaled_dot_product_attention`` (bool: True = attend).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        context_channels: int | None = None,
        init_mode: str = "xavier_uniform",
        qkv_gain: float = math.sqrt(0.2),
        proj_gain: float = 1e-5,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"Attention: channels={channels} is not divisible by num_heads={num_heads}")
        self.channels, self.num_heads = channels, num_heads
        self.cross = context_channels is not None
        if self.cross:
            self.q = Linear(channels, channels, init_mode=init_mode, init_gain=qkv_gain)
            self.kv = Linear(context_channels, 2 * channels, init_mode=init_mode, init_gain=qkv_gain)
        else:
            self.qkv = Linear(channels, 3 * channels, init_mode=init_mode, init_gain=qkv_gain)
        self.proj = Linear(channels, channels, init_mode=init_mode, init_gain=proj_gain)

    def _heads(self, t: Tensor) -> Tensor:
        # (B, L, n*C) -> n tensors (B, h, L, d)
        return t.unflatten(-1, (-1, self.num_heads, self.channels // self.num_heads)).permute(2, 0, 3, 1, 4)

    def forward(self, x: Tensor, context: Tensor | None = None, extra: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor (B, M, C_ctx)")
            q = self._heads(self.q(x))[0]
            k, v = self._heads(self.kv(context))
        else:
            if context is not None:
                raise ValueError("this Attention is self-attention; build it with context_channels=... for cross-attention")
            q, k, v = self._heads(self.qkv(x))
            if extra is not None:
                ke, ve = self._heads(F.linear(extra, self.qkv.weight[self.channels:], self.qkv.bias[self.channels:]))
                k, v = torch.cat([k, ke], dim=2), torch.cat([v, ve], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(w_i x), sin(w_i x)], w_i = max_positions^(-i / (n/2 - endpoint)).

    ``flip=True`` returns [sin, cos] instead, the order the DDPM++ network consumes.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False, flip: bool = False):
        super().__init__()
        if num_channels % 2:
            raise ValueError("PositionalEmbedding needs an even number of channels")
        half = num_channels // 2
        denom = max(half - (1 if endpoint else 0), 1)
        freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / denom)
        self.register_buffer("freqs", freqs, persistent=False)
        self.flip = flip

    def forward(self, x: Tensor) -> Tensor:
        a = torch.outer(x, self.freqs.to(x.dtype))
        return torch.cat([a.sin(), a.cos()] if self.flip else [a.cos(), a.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi f_i x), sin(2 pi f_i x)], f_i ~ N(0, scale^2) drawn once.

    The frequencies are a (persistent) buffer: they are part of the trained model.
    """

    def __init__(self, num_channels: int, scale: float = 16.0, flip: bool = False):
        super().__init__()
        if num_channels % 2:
            raise ValueError("FourierEmbedding needs an even number of channels")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)
        self.flip = flip

    def forward(self, x: Tensor) -> Tensor:
        a = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([a.sin(), a.cos()] if self.flip else [a.cos(), a.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-conv, embedding injection, GN-SiLU-dropout-conv, skip; then attention.

    Embedding injection: ``adaptive_scale=False`` adds affine(emb) before the second norm (DDPM++);
    ``True`` applies GN(h) * (1 + scale) + shift (ADM's scale/shift).
    The sum of branch and skip is multiplied by ``skip_scale`` (sqrt(1/2) keeps the variance).
    With ``attention``, self-attention over the H*W tokens follows; ``forward(..., views=V)`` makes
    it attend across the V consecutive images of each object (batch laid out (B*V, C, H, W)).
    With ``context_channels`` a cross-attention to ``context`` (B or B*V, M, C_ctx) follows.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        context_channels: int | None = None,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[int] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init_mode: str = "xavier_uniform",
        zero_gain: float = 1e-5,
        attn_gain: float = math.sqrt(0.2),
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        init = dict(init_mode=init_mode)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_mode=init_mode, init_gain=zero_gain)
        self.skip = None
        if out_channels != in_channels or up or down:
            k = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, k, up=up, down=down, resample_filter=resample_filter, **init)
        heads = num_heads if num_heads is not None else max(out_channels // channels_per_head, 1)
        self.attn = None
        if attention:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.attn = Attention(out_channels, heads, init_mode=init_mode, qkv_gain=attn_gain, proj_gain=zero_gain)
        self.cross_attn = None
        if context_channels is not None:
            self.norm3 = GroupNorm(out_channels, eps=eps)
            self.cross_attn = Attention(out_channels, heads, context_channels=context_channels, init_mode=init_mode,
                                        qkv_gain=attn_gain, proj_gain=zero_gain)

    def forward(self, x: Tensor, emb: Tensor, views: int = 1, context: Tensor | None = None) -> Tensor:
        orig = x
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = h.add_(self.skip(orig) if self.skip is not None else orig)
        if self.skip_scale != 1.0:
            x = x.mul_(self.skip_scale)
        if self.attn is not None:
            x = self._attend(self.attn, self.norm2(x), x, views, None)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass context=(B, M, C_ctx)")
            x = self._attend(self.cross_attn, self.norm3(x), x, 1, context)
        return x

    def _attend(self, attn: Attention, h: Tensor, x: Tensor, views: int, context: Tensor | None) -> Tensor:
        b, c, hh, ww = h.shape
        # (B*V, C, H, W) -> (B, V*H*W, C): tokens of all views of one object attend to each other.
        # Going through NHWC makes this a free view when the activations are channels-last.
        tokens = h.permute(0, 2, 3, 1).reshape(b // views, views * hh * ww, c)
        if context is not None and context.shape[0] != tokens.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} does not match {tokens.shape[0]} token groups")
        out = attn(tokens, context=context).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x = out.contiguous(memory_format=fmt).add_(x)
        if self.skip_scale != 1.0:
            x = x.mul_(self.skip_scale)
        return x


def batch_noise_labels(noise_label: Tensor, batch: int, like: Tensor) -> Tensor:
    """The noise label as a (B,) tensor in ``like``'s dtype (a scalar is broadcast over the batch)."""
    noise_label = noise_label.to(like.dtype)
    if noise_label.ndim == 0:
        noise_label = noise_label.expand(batch)
    if noise_label.shape != (batch,):
        raise ValueError(f"noise_label must have shape ({batch},), got {tuple(noise_label.shape)}")
    return noise_label


def class_labels(cond, batch: int, num_classes: int, like: Tensor, *, dropout: float, training: bool) -> Tensor:
    """One-hot class labels from ``cond["class"]`` (zeros = unconditional when absent), each row dropped
    with probability ``dropout`` in training: classifier-free guidance's label dropout."""
    labels = cond.get("class")
    if labels is None:
        labels = like.new_zeros(batch, num_classes)
    elif labels.shape != (batch, num_classes):
        raise ValueError(f"cond['class'] must be one-hot of shape ({batch}, {num_classes}), got {tuple(labels.shape)}")
    labels = labels.to(like.dtype)
    if training and dropout:
        keep = torch.rand(batch, 1, device=like.device) >= dropout
        labels = labels * keep.to(labels.dtype)
    return labels


def check_levels(height: int, width: int, levels: int, attn_res: set[int]) -> None:
    """A UNet of ``levels`` resolutions (each halving the last) fits H x W, and reaches every attention resolution."""
    factor = 2 ** (levels - 1)
    if height % factor or width % factor or height < factor or width < factor:
        ok = [factor * k for k in (1, 2, 4, 8, 16)]
        fewer = max(l for l in range(1, levels + 1) if height % 2 ** (l - 1) == 0 and width % 2 ** (l - 1) == 0)
        raise config_error(
            f"image size {height}x{width} cannot be halved {levels - 1} times (channel_mult has {levels} levels)",
            f"each UNet level halves the resolution, so H and W must be multiples of 2^{levels - 1} = {factor}",
            f"use an image size in {ok}..., or a channel_mult with at most {fewer} entries for {height}x{width}",
        )
    resolutions = [height >> l for l in range(levels)]
    missing = sorted(attn_res - set(resolutions))
    if missing:
        raise config_error(
            f"attn_resolutions {sorted(attn_res)} include {missing}, which this UNet never reaches",
            f"for {height}x{width} inputs and {levels} levels the resolutions are {resolutions}",
            f"set net.attn_resolutions to a subset of {resolutions} (e.g. [{resolutions[-1]}])",
        )
