"""Image datamodules: scikit-learn's bundled digits (the embedded default), CIFAR-10, any image folder."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from genflow.data.base import GenerativeDataModule
from genflow.errors import config_error

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _resize(x: Tensor, resolution: int | None) -> Tensor:
    if resolution is None or resolution == x.shape[-1]:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


class Digits(GenerativeDataModule):
    """The 1797 8x8 handwritten digits shipped with scikit-learn (16 grey levels), as 1-channel
    images in [-1, 1], at native 8x8 or upscaled (bilinear) to ``resolution``."""

    feature_extractor = "digits"
    name = "digits"
    _num_classes = 10

    def __init__(self, resolution: int = 8, **kwargs):
        super().__init__(**kwargs)
        if resolution < 8:
            raise config_error(f"data.resolution={resolution} is below the digits' native 8x8",
                               "downsampling the digits destroys them", "use data.resolution=8, 16 or 32")
        self.resolution = resolution
        # 16 grey levels + white = 17 values at native size; bilinear upscaling makes them continuous
        self.levels = 17 if resolution == 8 else None

    def examples(self) -> int:
        return 1797

    def _load(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
        return _resize(x, self.resolution).clamp(-1, 1), torch.as_tensor(digits.target, dtype=torch.long)


class CIFAR10(GenerativeDataModule):
    """CIFAR-10 training images (50k, 3x32x32) via torchvision; downloads only with ``download=true``."""

    feature_extractor = "inception"
    name = "cifar10"
    levels = 256
    _num_classes = 10

    def __init__(self, root: str | None = None, download: bool = False, xflip: bool = False, **kwargs):
        kwargs.setdefault("val_fraction", 0.0)
        super().__init__(**kwargs)
        root = root or os.environ.get("GENFLOW_DATA")
        if root is None:
            raise config_error("data=cifar10 needs data.root", "CIFAR-10 is not bundled and nothing downloads unasked",
                               "pass data.root=/path/to/cifar10 (the folder holding cifar-10-batches-py) or set "
                               "GENFLOW_DATA; add data.download=true to fetch it there once")
        self.root, self.download, self.xflip = Path(root).expanduser(), download, xflip
        if not download and not (self.root / "cifar-10-batches-py").is_dir():
            raise config_error(f"CIFAR-10 not found under {self.root}", "expected the folder cifar-10-batches-py there",
                               "point data.root at the folder that contains cifar-10-batches-py, "
                               "or add data.download=true to download it (170 MB)")

    def examples(self) -> int:
        return 50000  # the training batches

    def _load(self):
        from torchvision.datasets import CIFAR10 as TV

        ds = TV(str(self.root), train=True, download=self.download)
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.xflip and self.trainer is not None and self.trainer.training:
            x, cond = batch
            flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
            batch = (torch.where(flip, x.flip(-1), x), cond)
        return batch


def _open_image(path: Path, verify: bool = False):
    from PIL import Image

    try:
        img = Image.open(path)
        if verify:
            img.verify()
        else:
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise config_error(f"cannot decode image {path}", f"{type(err).__name__}: {err}",
                           "remove or replace the file (data.root is read recursively)") from err


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")   # PIL's modes of 16-bit greyscale PNGs


def _to_mode(img, mode: str):
    """``img`` as 8-bit ``mode`` ("L" or "RGB"): 16-bit greyscale scaled to 8 bits (PIL's ``convert`` would
    clip it, nearly all white), and transparency composited on white (as the multi-view data does) instead
    of dropped."""
    import numpy as np
    from PIL import Image

    if img.mode in SIXTEEN_BIT:
        levels = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(levels * (255 / 65535)), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert(mode)


class ImageFolder(GenerativeDataModule):
    """Every image under ``root`` (recursively), centre-cropped to a square and resized to
    ``resolution``; labels from sub-folder names when ``conditional=true``."""

    feature_extractor = "inception"
    name = "imagefolder"
    levels = 256

    def __init__(self, root: str | None = None, resolution: int = 32, channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        if root is None or not Path(root).expanduser().is_dir():
            raise config_error(f"data=imagefolder: data.root={root!r} is not a folder",
                               "imagefolder reads images from a local folder",
                               "pass data.root=/path/to/images (png/jpg files, optionally in class sub-folders)")
        self.root, self.resolution, self.channels = Path(root).expanduser(), resolution, channels
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise config_error(f"no images under {self.root}", f"looked for {sorted(IMAGE_SUFFIXES)} files",
                               "check data.root")
        # known before setup, so a conditional net (e.g. a converted ImageNet network) is built with its classes
        self._num_classes = len({p.parent.name for p in self.files})

    def examples(self) -> int:
        return len(self.files)

    def verify(self) -> None:
        """Every image file is readable (PIL's structural check, no full decode); a bad file is named.
        Run by train.py before the run starts."""
        for path in self.files:
            _open_image(path, verify=True)

    def _load(self):
        from PIL import Image
        import torchvision.transforms.functional as TF

        mode = {1: "L", 3: "RGB"}[self.channels]
        images = []
        for path in self.files:
            img = _to_mode(_open_image(path), mode)
            side = min(img.size)
            img = TF.center_crop(img, [side, side]).resize((self.resolution, self.resolution), Image.BICUBIC)
            images.append(TF.pil_to_tensor(img))
        x = torch.stack(images).float() / 127.5 - 1
        classes = sorted({p.parent.name for p in self.files})
        self._num_classes = len(classes)
        labels = torch.tensor([classes.index(p.parent.name) for p in self.files])
        return x, labels
