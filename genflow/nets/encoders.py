"""Image encoders that turn a reference image into Isotropic3D's conditioning embedding (B, E).

* ``OpenCLIPImageEncoder``: the released model's conditioner, OpenCLIP ViT-H-14's projected image
  embedding (1024-d). Preprocessing follows the released embedder: RGBA composited on white, bicubic
  antialiased resize to 224, [-1, 1] -> [0, 1], normalisation with the OpenAI CLIP mean/std. It needs
  the ``open_clip`` package and a *local* weights file; it never downloads.
* ``ImageStatsEncoder``: a parameter-free, deliberately lossy encoder for the toy set and tests:
  the mean foreground colour, the foreground fraction and the silhouette's extent and centre (8
  numbers). Per-face colours are averaged away, so a reference view carries information this
  embedding does not (with a lossless embedding the reference view would add nothing).
* ``SmallConvEncoder``: a small frozen convolutional encoder (seeded random weights, or trained
  weights from a file) with global pooling, for image data where hand-made statistics are too crude.

``build_encoder(name, **kwargs)`` picks one by name (``stats``, ``small``, ``openclip``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genflow.errors import config_error

__all__ = ["ImageStatsEncoder", "SmallConvEncoder", "OpenCLIPImageEncoder", "build_encoder", "ENCODERS"]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def composite_on_white(img: Tensor) -> Tensor:
    """(B, 4, H, W) RGBA in [-1, 1] -> (B, 3, H, W) RGB composited on white; RGB passes through."""
    if img.shape[1] == 4:
        alpha = (img[:, 3:] + 1) / 2
        return img[:, :3] * alpha + (1 - alpha)
    return img


class ImageStatsEncoder(nn.Module):
    """Lossy statistics of an RGB image in [-1, 1] on a white background -> (B, 8).

    [mean foreground R, G, B, foreground fraction, silhouette width, height, centre x, centre y],
    foreground = pixels whose distance from white exceeds ``threshold``; all in about [-1, 1].
    """

    dim = 8

    def __init__(self, threshold: float = 0.05):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, img: Tensor) -> Tensor:
        img = composite_on_white(img)
        b, _, h, w = img.shape
        fg = ((1 - img).abs().amax(dim=1) > self.threshold).to(img.dtype)          # (B, H, W)
        area = fg.sum(dim=(1, 2))
        denom = area.clamp_min(1.0)
        mean_rgb = (img * fg[:, None]).sum(dim=(2, 3)) / denom[:, None]
        ys = torch.linspace(-1, 1, h, device=img.device, dtype=img.dtype)
        xs = torch.linspace(-1, 1, w, device=img.device, dtype=img.dtype)
        col, row = fg.amax(dim=1), fg.amax(dim=2)                                 # (B, W), (B, H)
        # extent of the occupied columns/rows; an empty image gives zero extent
        x_lo = torch.where(col > 0, xs, xs.new_tensor(2.0)).amin(dim=1)
        x_hi = torch.where(col > 0, xs, xs.new_tensor(-2.0)).amax(dim=1)
        y_lo = torch.where(row > 0, ys, ys.new_tensor(2.0)).amin(dim=1)
        y_hi = torch.where(row > 0, ys, ys.new_tensor(-2.0)).amax(dim=1)
        has = (area > 0).to(img.dtype)
        width, height = (x_hi - x_lo).clamp_min(0) * has, (y_hi - y_lo).clamp_min(0) * has
        cx = (fg.sum(dim=1) * xs).sum(dim=1) / denom
        cy = (fg.sum(dim=2) * ys).sum(dim=1) / denom
        return torch.stack([mean_rgb[:, 0], mean_rgb[:, 1], mean_rgb[:, 2], area / (h * w) * 2 - 1,
                            width - 1, height - 1, cx, cy], dim=1)


class SmallConvEncoder(nn.Module):
    """Frozen small CNN: 3 stride-2 convs + global average pooling + linear -> (B, dim).

    ``weights``: a ``torch.save``d state_dict to load; without it the weights are drawn from
    ``seed``, so every process and run gets the same (random-feature) encoder.
    """

    def __init__(self, dim: int = 32, channels: int = 32, seed: int = 0, weights: str | None = None):
        super().__init__()
        self.dim = dim
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, channels, 3, 2, 1), nn.Conv2d(channels, channels, 3, 2, 1),
                                    nn.Conv2d(channels, channels, 3, 2, 1)])
        self.proj = nn.Linear(channels, dim)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5 if p.ndim > 1 else torch.zeros(p.shape))
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise config_error(f"encoder weights file {path} does not exist", "the small encoder was asked to load it",
                                   "fix data.encoder.weights or set it to null for the seeded random encoder")
            self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, img: Tensor) -> Tensor:
        h = composite_on_white(img)
        for conv in self.convs:
            h = F.silu(conv(h))
        return self.proj(h.mean(dim=(2, 3)))


class OpenCLIPImageEncoder(nn.Module):
    """OpenCLIP image tower (default ViT-H-14, 1024-d) loaded from a local weights file only."""

    def __init__(self, weights: str | None, arch: str = "ViT-H-14", dim: int = 1024, image_size: int = 224):
        super().__init__()
        check_encoder("openclip", weights=weights, arch=arch)
        path = Path(weights)
        model = _open_clip(arch).create_model(arch, pretrained=None)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        model.load_state_dict(state)
        self.visual = model.visual  # the text tower is not needed
        self.dim, self.image_size = dim, image_size
        self.register_buffer("mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, img: Tensor) -> Tensor:
        x = composite_on_white(img)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=True, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.visual(x).float()


ENCODERS = {"stats": ImageStatsEncoder, "small": SmallConvEncoder, "openclip": OpenCLIPImageEncoder}


def check_encoder(name: str = "stats", weights: str | None = None, arch: str = "ViT-H-14", **_) -> None:
    """What an encoder needs, checked without building it (train.py runs this before the run starts): a known
    name, and for openclip a local weights file and the open_clip package."""
    if name not in ENCODERS:
        raise config_error(f"data.encoder.name={name!r} is unknown", "only these image encoders exist",
                           f"choose one of {', '.join(ENCODERS)}")
    if name == "stats" and weights is not None:
        raise config_error(f"data.encoder.weights={weights} for the stats encoder",
                           "it computes fixed image statistics and has no weights",
                           "drop data.encoder.weights, or use data.encoder.name=small or openclip")
    if name == "openclip":
        path = Path(weights) if weights else None
        if path is None or not path.is_file():
            raise config_error(
                f"OpenCLIP weights file {str(path) if path else '(data.encoder.weights not set)'} not found",
                f"the {arch} image encoder is loaded from a local file and nothing is downloaded at run time",
                f"download the open_clip {arch} checkpoint (e.g. laion2b_s32b_b79k, open_clip_pytorch_model.bin or "
                ".safetensors) once and pass data.encoder.weights=/path/to/it, or use data.encoder.name=stats")
        _open_clip(arch)


def _open_clip(arch: str):
    try:
        import open_clip
    except ImportError as e:
        raise config_error("the open_clip package is not installed", f"data.encoder.name=openclip needs it to build {arch}",
                           "pip install open_clip_torch (weights stay local), or use data.encoder.name=stats") from e
    return open_clip


def build_encoder(name: str = "stats", **kwargs) -> nn.Module:
    """Encoder by name; ``kwargs`` go to its constructor (``dim`` is checked against the encoder's width)."""
    check_encoder(name, **kwargs)
    dim, weights = kwargs.pop("dim", None), kwargs.pop("weights", None)
    if name == "stats":
        enc = ImageStatsEncoder(**kwargs)
    elif name == "small":
        enc = SmallConvEncoder(dim=dim or 32, weights=weights, **kwargs)
    else:
        enc = OpenCLIPImageEncoder(weights, dim=dim or 1024, **kwargs)
    if dim is not None and dim != enc.dim:
        raise config_error(f"data.encoder.dim={dim} but the {name} encoder gives {enc.dim}-d embeddings",
                           "the net's cross-attention width must match the embedding", f"set data.encoder.dim={enc.dim}")
    return enc.eval()
