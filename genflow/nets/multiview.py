"""MultiViewUNet: the multi-view denoiser of MVDream / Isotropic3D on genflow's shared UNet blocks.

Isotropic3D (arXiv 2403.10395) fine-tunes MVDream's multi-view UNet with an image embedding in place
of text (Stage 1) and then with Explicit Multi-view Attention (EMA, Stage 2): the noise-free
reference image joins the cross-view attention as one extra frame. How each piece maps here
(the paper and MVDream's released design):

* layout: views are flattened object-major, (B*V, C, H, W) with row b*V + v; ResBlocks, GroupNorms
  and convolutions act per view (``UNetBlock``), self-attention runs over the tokens of all views of
  one object ("3d", ``views=F``) or per view ("2d", ``views=1``, MVDream's 2D batches);
* camera: flattened 4x4 camera-to-world with unit translation -> 2-layer MLP, added to the noise
  embedding, so views are told apart only through the ResBlocks' embedding (no view embedding);
* image embedding: a single cross-attention token per frame, (B*F, 1, E); with one key the softmax
  is 1 and the layer adds the same vector at every position; the unconditional branch is the zero
  embedding (``genflow.methods.base.null_cond``);
* EMA reference: cond["reference"] (B, C, H, W) becomes frame V (``reference_slot``) with its own
  noise label (``reference_timestep``: "zero" = cond["reference_noise_label"], or "shared" = the
  targets' label) and camera (``reference_camera``: "pose" or "zero"). The running method puts the
  reference in as it feeds clean data (``Method.net_cond``: EDM/PFGM++ c_in x and c_noise at
  sigma_min, flow matching t = 1, DDPM/SPD s = 1/T), so the net holds no method constants. It is never
  noised (it is conditioning, not part of x), its prediction is dropped before the output, so it
  gets no loss, and in training it is dropped per object with probability ``p_drop_ref`` by masking
  its keys out of the cross-view attention, which is exactly the computation without it. Inference
  runs without it (same weights, no extra parameters).
* condition dropout for classifier-free guidance happens here in training mode (CONTRACTS.md):
  ``p_drop_emb`` zeroes the image embedding of an object; cameras stay, as ``null_cond`` keeps them
  in the unconditional branch (the released sampler's choice). ``drop_camera_with_emb=True`` zeroes
  them together with the embedding, for models guided on cameras too.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from genflow.errors import config_error
from genflow.knobs import Knob
from genflow.nets.layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock

__all__ = ["MultiViewUNet", "flatten_cameras"]

ATTENTION_MODES = ("3d", "2d")
REF_SLOTS = ("last", "first")
REF_TIMESTEPS = ("zero", "shared")
REF_CAMERAS = ("pose", "zero")


def flatten_cameras(c2w: Tensor, eps: float = 1e-8) -> Tensor:
    """(..., 4, 4) camera-to-world -> (..., 16) with the translation scaled to unit length."""
    t = c2w[..., :3, 3]
    scale = 1.0 / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    rows = torch.cat([c2w[..., :3, :3], t[..., None] * scale[..., None]], dim=-1)
    return torch.cat([rows, c2w[..., 3:, :]], dim=-2).flatten(-2)


class _MVBlock(UNetBlock):
    """UNetBlock whose cross-view self-attention can mask key frames (a dropped reference)."""

    _key_mask: Tensor | None = None

    def forward(self, x: Tensor, emb: Tensor, views: int = 1, context: Tensor | None = None,
                key_mask: Tensor | None = None) -> Tensor:
        self._key_mask = key_mask if views > 1 else None
        try:
            return super().forward(x, emb, views=views, context=context)
        finally:
            self._key_mask = None

    def _attend(self, attn, h, x, views, context):
        if context is not None or self._key_mask is None:
            return super()._attend(attn, h, x, views, context)
        hh, ww = h.shape[-2:]
        tokens = rearrange(h, "(b f) c h w -> b (f h w) c", f=views)
        # True = this frame's tokens may be attended to
        mask = repeat(self._key_mask, "b f -> b 1 1 (f hw)", hw=hh * ww)
        out = attn(tokens, mask=mask)
        out = rearrange(out, "b (f h w) c -> (b f) c h w", f=views, h=hh, w=ww)
        x = out.add_(x)
        if self.skip_scale != 1.0:
            x = x.mul_(self.skip_scale)
        return x


class MultiViewUNet(nn.Module):
    """Multi-view denoiser ``net(x, noise_label, cond)``; x (B, V, C, H, W), output shaped like x.

    cond: ``camera`` (B, V, 4, 4) required; ``image_emb`` (B, E) (absent = unconditional);
    ``reference`` (B, C, H, W) and ``reference_camera`` (B, 4, 4) used from ``stage=2`` on.
    Any V works at run time (no parameter depends on it); ``data_shape`` fixes C, H, W.
    """

    knobs = (Knob("stage", int, 1, "Isotropic3D training stage: 1 image embedding + cameras, 2 also the noise-free "
                  "reference view", choices=(1, 2), section="net"),)

    def __init__(
        self,
        *,
        data_shape: Sequence[int],
        num_classes: int = 0,
        embedding_dim: int = 8,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_blocks: int = 1,
        attn_resolutions: Sequence[int] = (8,),
        channels_per_head: int = 32,
        dropout: float = 0.0,
        attention: str = "3d",
        pos_embed: bool = True,
        stage: int = 2,
        p_drop_emb: float = 0.1,
        p_drop_ref: float = 0.1,
        drop_camera_with_emb: bool = False,
        reference_slot: str = "last",
        reference_timestep: str = "zero",
        reference_camera: str = "pose",
    ):
        super().__init__()
        if len(data_shape) != 4:
            raise config_error(f"MultiViewUNet got data_shape={tuple(data_shape)}",
                               "it denoises multi-view batches (B, V, C, H, W), so data_shape must be (V, C, H, W)",
                               "use data=multiview (or another multi-view datamodule) with net=multiview")
        if num_classes:
            raise config_error(f"MultiViewUNet got num_classes={num_classes}",
                               "it is conditioned on an image embedding and cameras, not on class labels",
                               "set data.conditional=false")
        _choice("attention", attention, ATTENTION_MODES)
        _choice("reference_slot", reference_slot, REF_SLOTS)
        _choice("reference_timestep", reference_timestep, REF_TIMESTEPS)
        _choice("reference_camera", reference_camera, REF_CAMERAS)
        for name, p in (("p_drop_emb", p_drop_emb), ("p_drop_ref", p_drop_ref)):
            if not 0.0 <= p <= 1.0:
                raise config_error(f"net.{name}={p} is not a probability", "it is a per-object dropout rate",
                                   f"set net.{name} in [0, 1]")
        if stage not in (1, 2):
            raise config_error(f"stage={stage}", "Isotropic3D has stage 1 (image embedding) and 2 (+ reference view)",
                               "pass stage=1 or stage=2")
        _, c, h, w = data_shape
        if h != w or h % (2 ** (len(channel_mult) - 1)):
            raise config_error(f"resolution {h}x{w} with {len(channel_mult)} levels",
                               "the UNet needs square images divisible by 2^(levels-1)",
                               "change data.resolution or net.channel_mult")
        self.data_shape, self.img_channels, self.embedding_dim = tuple(data_shape), c, embedding_dim
        self.attention_mode = attention
        self.stage, self.use_reference = stage, stage >= 2
        self.p_drop_emb, self.p_drop_ref, self.drop_camera_with_emb = p_drop_emb, p_drop_ref, drop_camera_with_emb
        self.reference_slot, self.reference_timestep = reference_slot, reference_timestep
        self.reference_camera = reference_camera

        emb_ch = 4 * model_channels
        self.noise_embed = PositionalEmbedding(model_channels, endpoint=True)
        self.noise_mlp = nn.Sequential(Linear(model_channels, emb_ch), nn.SiLU(), Linear(emb_ch, emb_ch))
        self.camera_mlp = nn.Sequential(Linear(16, emb_ch), nn.SiLU(), Linear(emb_ch, emb_ch))
        block = dict(emb_channels=emb_ch, channels_per_head=channels_per_head, dropout=dropout)

        self.conv_in = Conv2d(c, model_channels, 3)
        # one learned positional map shared by all views keeps the net view-permutation equivariant
        self.pos = nn.Parameter(torch.randn(model_channels, h, w) * 0.02) if pos_embed else None
        self.enc, self.dec = nn.ModuleList(), nn.ModuleList()
        self._enc_attn, self._dec_attn = [], []
        skips, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            res = h >> level
            if level > 0:
                self.enc.append(_MVBlock(ch, ch, down=True, **block))
                skips.append(ch)
            for _ in range(num_blocks):
                attn = res in attn_resolutions
                self.enc.append(_MVBlock(ch, model_channels * mult, attention=attn,
                                         context_channels=embedding_dim if attn else None, **block))
                ch = model_channels * mult
                skips.append(ch)
        self.mid = nn.ModuleList([
            _MVBlock(ch, ch, attention=True, context_channels=embedding_dim, **block),
            _MVBlock(ch, ch, **block),
        ])
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = h >> level
            for _ in range(num_blocks + 1):
                attn = res in attn_resolutions
                self.dec.append(_MVBlock(ch + skips.pop(), model_channels * mult, attention=attn,
                                         context_channels=embedding_dim if attn else None, **block))
                ch = model_channels * mult
            if level > 0:
                self.dec.append(_MVBlock(ch, ch, up=True, **block))
        self.norm_out = GroupNorm(ch)
        self.conv_out = Conv2d(ch, c, 3, init_gain=1e-5)

    # ------------------------------------------------------------------------------------------
    def dropout_masks(self, batch: int, device=None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-object keep flags (B,) for the image embedding and the reference (training only)."""
        u = torch.rand(2, batch, device=device, generator=generator)
        return u[0] >= self.p_drop_emb, u[1] >= self.p_drop_ref

    def forward(self, x: Tensor, noise_label: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"MultiViewUNet expects x of shape (B, V, C, H, W), got {tuple(x.shape)}")
        b, v = x.shape[:2]
        cond = cond or {}
        if "camera" not in cond:
            raise ValueError("MultiViewUNet needs cond['camera'] (B, V, 4, 4): the views are told apart by their cameras")
        camera = cond["camera"]
        if camera.shape[:2] != (b, v):
            raise ValueError(f"cond['camera'] has shape {tuple(camera.shape)}, expected ({b}, {v}, 4, 4)")
        dtype = x.dtype
        emb_img = cond.get("image_emb")
        if emb_img is None:
            emb_img = x.new_zeros(b, self.embedding_dim)
        if emb_img.shape != (b, self.embedding_dim):
            raise ValueError(f"cond['image_emb'] has shape {tuple(emb_img.shape)}, expected ({b}, {self.embedding_dim})")
        cams = flatten_cameras(camera.to(dtype))                          # (B, V, 16)
        labels = repeat(noise_label.to(dtype), "b -> b v", v=v)         # one noise level per object

        ref = cond.get("reference") if self.use_reference else None
        keep_ref = None
        if self.training and (self.p_drop_emb > 0 or (ref is not None and self.p_drop_ref > 0)):
            keep_emb, keep_ref = self.dropout_masks(b, x.device)
            emb_img = emb_img * keep_emb[:, None].to(dtype)
            if self.drop_camera_with_emb:
                cams = cams * keep_emb[:, None, None].to(dtype)
            if ref is None or self.p_drop_ref == 0:
                keep_ref = None

        frames, key_mask = x, None
        if ref is not None:
            if ref.shape != (b, *x.shape[2:]):
                raise ValueError(f"cond['reference'] has shape {tuple(ref.shape)}, expected ({b}, {', '.join(map(str, x.shape[2:]))})")
            if self.reference_camera == "pose":
                if "reference_camera" not in cond:
                    raise ValueError("net.reference_camera=pose needs cond['reference_camera'] (B, 4, 4)")
                ref_cam = flatten_cameras(cond["reference_camera"].to(dtype))
            else:
                ref_cam = cams.new_zeros(b, 16)
            if self.reference_timestep == "shared":
                ref_label = labels[:, 0]
            elif "reference_noise_label" in cond:
                ref_label = cond["reference_noise_label"].to(dtype).reshape(b)
            else:
                raise ValueError("net.reference_timestep=zero needs cond['reference_noise_label'] (B,): call the "
                                 "net through a Method (Method.net_cond adds the clean view of the reference)")
            first = self.reference_slot == "first"
            frames = _join(x, ref.to(dtype)[:, None], first)
            cams = _join(cams, ref_cam[:, None], first)
            labels = _join(labels, ref_label[:, None], first)
            if keep_ref is not None:
                key_mask = _join(torch.ones(b, v, dtype=torch.bool, device=x.device), keep_ref[:, None], first)
        nf = frames.shape[1]

        emb = F.silu(self.noise_mlp(self.noise_embed(rearrange(labels, "b f -> (b f)")))
                     + self.camera_mlp(rearrange(cams, "b f k -> (b f) k")))
        context = repeat(emb_img, "b e -> (b f) 1 e", f=nf)  # one cross-attention token per frame
        views = nf if self.attention_mode == "3d" else 1
        kw = dict(views=views, key_mask=key_mask)

        h = self.conv_in(rearrange(frames, "b f c h w -> (b f) c h w"))
        if self.pos is not None:
            h = h + self.pos.to(h.dtype)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb, context=context if blk.cross_attn is not None else None, **kw)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb, context=context if blk.cross_attn is not None else None, **kw)
        for blk in self.dec:
            if blk.conv0.up:
                h = blk(h, emb, **kw)
            else:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb,
                        context=context if blk.cross_attn is not None else None, **kw)
        out = rearrange(self.conv_out(F.silu(self.norm_out(h))), "(b f) c h w -> b f c h w", b=b)
        if nf == v:
            return out
        # the reference frame's prediction is discarded here: it never reaches a loss
        return out[:, 1:] if self.reference_slot == "first" else out[:, :v]


def _join(targets: Tensor, ref: Tensor, first: bool) -> Tensor:
    return torch.cat([ref, targets] if first else [targets, ref], dim=1)


def _choice(name: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise config_error(f"net.{name}={value!r} is not one of {', '.join(options)}",
                           "the multi-view net only implements these modes", f"set net.{name} to one of {list(options)}")
