"""Feature extractors for FID behind one interface.

Every extractor is an ``nn.Module`` taking genflow images (float NCHW in [-1, 1], any device) and
returning float32 features (B, dim), with a ``name``, a ``dim`` and a ``fingerprint()`` (a content
hash used as part of cache keys for reference statistics).

- ``inception``: the TF-ported Inception-v3 TorchScript file ``inception-2015-12-05.pt`` (the file
  clean-fid, StyleGAN2-ADA and EDM's detector derive from), loaded through clean-fid's own wrapper
  ``InceptionV3W``. Mode ``legacy_tensorflow`` resizes to 299x299 inside the network (the TTUR / EDM
  protocol, comparable with published numbers); mode ``clean`` resizes outside with clean-fid's PIL
  bicubic resizer (``cleanfid.resize.build_resizer("clean")``), run on a thread pool because PIL
  releases the GIL. Images are first quantised to uint8 exactly as saving PNGs would.
  Nothing downloads unless asked (``download=True``); a missing file is a ConfigError.
- ``digits``: ``DigitsClassifier``, a small CNN trained on the digits training split
  (``scripts/train_digits_classifier.py``, weights in ``assets/digits_classifier.safetensors``);
  features are its penultimate activations.
- ``dinov2``: DINOv2 ViT-L/14 (Oquab et al. 2023), the network of EDM2's FD_DINOv2: the class token after the
  final norm (1024-d) of images resized to 224x224 (bicubic, antialiased), scaled to [0, 1] and normalised
  with ImageNet's mean and std, as EDM2's ``calculate_metrics.py`` feeds it. The architecture is timm's
  ``vit_large_patch14_dinov2`` (built without weights, positions interpolated from 518 px at run time);
  the weights are a local file, Meta's ``dinov2_vitl14_pretrain.pth`` or timm's ``model.safetensors``,
  never downloaded.
- any other ``nn.Module`` (``ModuleFeatures``): its flattened output is the feature vector.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genflow.cache import content_hash, file_sha256
from genflow.errors import config_error
from genflow.sampling import to_uint8

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "GENFLOW_INCEPTION"
METRICS_HOME_ENV = "GENFLOW_METRICS_HOME"
ASSETS = Path(__file__).resolve().parents[2] / "assets"
DIGITS_WEIGHTS = ASSETS / "digits_classifier.safetensors"
INCEPTION_MODES = ("clean", "legacy_tensorflow")
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
DINOV2_ENV = "GENFLOW_DINOV2"


def metrics_home() -> Path:
    """Folder for downloaded weights and cached reference statistics ($GENFLOW_METRICS_HOME or ~/.cache/genflow)."""
    return Path(os.environ.get(METRICS_HOME_ENV, Path.home() / ".cache" / "genflow")).expanduser()


def resolve_inception_path(path: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Find ``inception-2015-12-05.pt``: the given path (file or folder), $GENFLOW_INCEPTION,
    $GENFLOW_METRICS_HOME, or clean-fid's own download folder. Downloads only when ``download``."""
    candidates: list[Path] = []
    for p in (path, os.environ.get(INCEPTION_ENV)):
        if p:
            p = Path(p).expanduser()
            candidates.append(p / INCEPTION_FILE if p.is_dir() else p)
    candidates += [metrics_home() / INCEPTION_FILE, Path(tempfile.gettempdir()) / INCEPTION_FILE]
    for c in candidates:
        if c.is_file():
            return c
    if download:
        from cleanfid.downloads_helper import check_download_inception

        target = Path(path).expanduser() if path else metrics_home()
        target = target if target.suffix != ".pt" else target.parent
        target.mkdir(parents=True, exist_ok=True)
        return Path(check_download_inception(fpath=str(target)))
    looked = ", ".join(str(c) for c in candidates)
    raise config_error(
        f"Inception weights {INCEPTION_FILE} not found (looked at: {looked})",
        "FID compares Inception-v3 features; genflow never downloads weights unless asked",
        f"download {INCEPTION_URL} once and pass fid.inception_path=/path/to/{INCEPTION_FILE} "
        f"(or set ${INCEPTION_ENV}, or put it in ${METRICS_HOME_ENV}); on a networked machine "
        "fid.download=true fetches it",
    )


class InceptionFeatures(nn.Module):
    """2048-d pool features of the TF-Inception TorchScript model, via clean-fid's ``InceptionV3W``."""

    dim = 2048

    def __init__(self, path: str | os.PathLike | None = None, mode: str = "clean", download: bool = False,
                 resize_workers: int | None = None):
        super().__init__()
        if mode not in INCEPTION_MODES:
            raise config_error(f"fid.mode={mode!r} is not an Inception mode", f"supported: {INCEPTION_MODES}",
                               "use fid.mode=clean (clean-fid) or fid.mode=legacy_tensorflow (EDM/TTUR numbers)")
        from cleanfid.inception_torchscript import InceptionV3W

        file = resolve_inception_path(path, download)
        folder = file.parent
        if file.name != INCEPTION_FILE:
            # InceptionV3W loads <folder>/inception-2015-12-05.pt; give it a folder with that name
            folder = Path(tempfile.mkdtemp(prefix="genflow-inception-"))
            (folder / INCEPTION_FILE).symlink_to(file.resolve())
        self.file, self.mode = file, mode
        self.name = f"inception-{mode}"
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice; the file only exists as TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.model = InceptionV3W(str(folder), download=False, resize_inside=(mode == "legacy_tensorflow")).eval()
        self.model.requires_grad_(False)
        self._resize = None
        self._workers = resize_workers or os.cpu_count() or 1
        self._pool = None
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"{self.name}-{file_sha256(self.file)[:16]}"
        return self._fingerprint

    def _clean_resize(self, images_u8: Tensor) -> Tensor:
        from cleanfid.resize import build_resizer

        if self._resize is None:
            self._resize = build_resizer("clean")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers)
        hwc = images_u8.permute(0, 2, 3, 1).cpu().numpy()
        out = list(self._pool.map(self._resize, hwc))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.model.base.parameters()).device
        u8 = to_uint8(images)
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        if u8.shape[1] != 3:
            raise ValueError(f"Inception features need 1- or 3-channel images, got {u8.shape[1]} channels")
        if self.mode == "clean":
            x = self._clean_resize(u8).to(device, non_blocking=True)
        else:
            x = u8.to(device).float()
        return self.model(x).float()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"] = None
        return state


def resolve_dinov2_path(path: str | os.PathLike | None = None) -> Path:
    """The DINOv2 ViT-L/14 weights: the given file, $GENFLOW_DINOV2, or $GENFLOW_METRICS_HOME/dinov2_vitl14_pretrain.pth."""
    candidates = [Path(p).expanduser() for p in (path, os.environ.get(DINOV2_ENV)) if p]
    candidates.append(metrics_home() / DINOV2_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise config_error(
        f"DINOv2 weights not found (looked at: {', '.join(map(str, candidates))})",
        "FD_DINOv2 compares DINOv2 ViT-L/14 features; genflow never downloads weights unasked",
        f"download {DINOV2_URL} once and put it at {metrics_home() / DINOV2_FILE} (or pass "
        f"fid.dinov2_path=/path/to/{DINOV2_FILE}, or set ${DINOV2_ENV}); timm's model.safetensors of "
        "vit_large_patch14_dinov2.lvd142m works too")


def dinov2_architecture() -> nn.Module:
    """DINOv2 ViT-L/14 without weights (on the meta device: no time spent initialising 300M parameters that
    the weights replace), 518 px positions interpolated to the input size on every call, no head."""
    import timm

    with torch.device("meta"):
        return timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)


class DINOv2Features(nn.Module):
    """1024-d DINOv2 ViT-L/14 features with EDM2's preprocessing (module docstring). ``weights``: a file
    (``resolve_dinov2_path``) or a state dict (Meta's layout or timm's)."""

    name = "dinov2"
    dim = 1024
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, weights: str | os.PathLike | Mapping | None = None):
        super().__init__()
        from timm.models.vision_transformer import checkpoint_filter_fn

        if isinstance(weights, Mapping):
            state, self.file = dict(weights), None
        else:
            self.file = resolve_dinov2_path(weights)
            state = self._read(self.file)
        model = dinov2_architecture()
        if "mask_token" in state or "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
            state = checkpoint_filter_fn(state, model)  # Meta's checkpoint layout -> timm's
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise config_error(f"the DINOv2 weights {self.file or '(given)'} do not fit ViT-L/14",
                               str(err).splitlines()[0], f"use {DINOV2_FILE} ({DINOV2_URL})") from None
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1) * 255, persistent=False)
        self._fingerprint: str | None = None

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise config_error(f"cannot read the DINOv2 weights {path}", f"{type(err).__name__}: {err}",
                               f"download {DINOV2_URL} again") from None
        return state.get("model", state) if isinstance(state, dict) else {}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            if self.file is not None:
                self._fingerprint = f"dinov2-{file_sha256(self.file)[:16]}"
            else:
                state = sorted(self.model.state_dict().items())
                self._fingerprint = "dinov2-" + content_hash(*(part for k, v in state for part in (k, v)), length=16)
        return self._fingerprint

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = to_uint8(images).to(self.mean.device).float()  # the images as PNGs would store them
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
        return self.model((x - self.mean) / self.std).float()


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 one-channel digits in [-1, 1]; ``features`` are its penultimate activations.

    Larger inputs (data.resolution=16/32 are bilinear upsamplings of 8x8) are area-downsampled to 8x8.
    """

    feature_dim = 64

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 16, self.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, 8)
        return x

    def features(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class DigitsFeatures(nn.Module):
    """Penultimate features of the shipped digits classifier."""

    name = "digits"
    dim = DigitsClassifier.feature_dim

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        from safetensors.torch import load_file

        self.file = Path(weights).expanduser() if weights else DIGITS_WEIGHTS
        if not self.file.is_file():
            raise config_error(
                f"digits classifier weights {self.file} not found",
                "digits-FID uses the features of a classifier shipped in assets/",
                "restore assets/digits_classifier.safetensors from the repository or regenerate it with "
                "`python scripts/train_digits_classifier.py`",
            )
        self.classifier = DigitsClassifier()
        self.classifier.load_state_dict(load_file(str(self.file)))
        self.classifier.eval().requires_grad_(False)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"digits-{file_sha256(self.file)[:16]}"
        return self._fingerprint

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.classifier.parameters()).device
        return self.classifier.features(images.to(device))


class ModuleFeatures(nn.Module):
    """Any ``nn.Module``: its output, flattened per image, is the feature vector."""

    def __init__(self, module: nn.Module, name: str | None = None):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.name = name or type(module).__name__
        self.dim = getattr(module, "num_features", None) or getattr(module, "dim", None)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            state = sorted(self.module.state_dict().items())
            digest = content_hash(type(self.module).__qualname__, *(part for k, v in state for part in (k, v)),
                                  length=16)
            self._fingerprint = f"{self.name}-{digest}"
        return self._fingerprint

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        params = list(self.module.parameters())
        if params:
            images = images.to(params[0].device)
        out = self.module(images)
        return out.reshape(out.shape[0], -1).float()


def build_feature_extractor(spec: Any = "inception", *, mode: str = "clean", inception_path=None,
                            download: bool = False, digits_weights=None, dinov2_path=None, device=None) -> nn.Module:
    """Make an extractor from a name ("inception", "digits", "dinov2"), a config with ``_target_``, or a module."""
    if isinstance(spec, nn.Module):
        ext = spec if hasattr(spec, "fingerprint") else ModuleFeatures(spec)
    elif isinstance(spec, str) and spec == "inception":
        ext = InceptionFeatures(inception_path, mode=mode, download=download)
    elif isinstance(spec, str) and spec == "digits":
        ext = DigitsFeatures(digits_weights)
    elif isinstance(spec, str) and spec == "dinov2":
        ext = DINOv2Features(dinov2_path)
    elif isinstance(spec, Mapping) or (hasattr(spec, "keys") and "_target_" in spec):
        from hydra.utils import instantiate

        module = instantiate(spec)
        if not isinstance(module, nn.Module):
            raise config_error(f"fid.extractor target {spec.get('_target_')} built a {type(module).__name__}",
                               "a feature extractor must be an nn.Module mapping images to (B, d) features",
                               "point _target_ at an nn.Module class")
        ext = module if hasattr(module, "fingerprint") else ModuleFeatures(module)
    else:
        raise config_error(f"fid.extractor={spec!r} is not a known feature extractor",
                           "FID needs a feature network", "use inception, digits, dinov2, or a {_target_: ...} module config")
    if device is not None:
        ext = ext.to(device)
    return ext


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 256, stats=None, progress: bool = False):
    """Feed ``images`` through ``extractor`` in chunks; update and return a FeatureStats."""
    from genflow.metrics.fid import FeatureStats

    stats = stats if stats is not None else FeatureStats()
    chunks = range(0, images.shape[0], batch_size)
    if progress:
        from genflow.progress import track

        chunks = track(chunks, description=f"features ({getattr(extractor, 'name', 'extractor')})")
    for i in chunks:
        stats.update(extractor(images[i : i + batch_size]))
    return stats
