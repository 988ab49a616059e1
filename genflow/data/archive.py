"""EDM's data set archives: an uncompressed ZIP of PNG images plus ``dataset.json``.

The format EDM's and EDM2's ``dataset_tool.py`` write (Karras et al.), read here without unpacking and
written by ``genflow-dataset`` (``genflow/apps/dataset.py``):

- members ``NNNNN/imgNNNNNNNN.png``: image i is ``f"{i:08d}"``'s first five digits as a folder, then
  ``img`` + the eight digits + ``.png``; stored uncompressed (ZIP_STORED), PNGs written with compression
  level 0;
- every image square, a power of two wide, 1 (grey) or 3 (RGB) channels, all alike;
- ``dataset.json`` = ``{"labels": [[member, class], ...]}`` with integer classes, or ``{"labels": null}``
  for an unlabelled set. A reader orders the images by member name.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from genflow.data.base import GenerativeDataModule
from genflow.errors import config_error

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
META = "dataset.json"


def member_name(index: int) -> str:
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


def _bad_archive(path, what: str, why: str) -> Exception:
    return config_error(f"{path}: {what}", why,
                        "rebuild the archive with `genflow-dataset source=FOLDER dest=NAME.zip` (or EDM's "
                        "dataset_tool.py), or point data.path at another one")


class ImageArchive:
    """An open archive: its image members (sorted), their integer labels or None, and decoding."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise config_error(f"data=zip: data.path={str(path)!r} is not a file",
                               "the zip data set reads one archive in EDM's dataset_tool.py format",
                               "pass data.path=/path/to/cifar10-32x32.zip (make one with genflow-dataset)")
        if not zipfile.is_zipfile(self.path):
            raise _bad_archive(self.path, "is not a ZIP archive", "EDM's data sets are ZIP files of PNGs")
        self.zip = zipfile.ZipFile(self.path)
        names = set(self.zip.namelist())
        self.members = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES)
        if not self.members:
            raise _bad_archive(self.path, "holds no images", f"looked for {sorted(IMAGE_SUFFIXES)} members")
        self.labels = self._labels(names)

    def _labels(self, names: set[str]) -> list[int] | None:
        if META not in names:
            return None
        try:
            labels = json.loads(self.zip.read(META))["labels"]
        except (ValueError, KeyError, TypeError) as err:
            raise _bad_archive(self.path, f"{META} does not read as {{\"labels\": ...}} ({err})",
                               "the labels are a JSON list of [member, class] pairs, or null") from None
        if labels is None:
            return None
        try:
            table = {str(name): value for name, value in labels}
        except (TypeError, ValueError):
            raise _bad_archive(self.path, f"{META} labels are not [member, class] pairs",
                               "each label pairs an image member with its class") from None
        missing = [m for m in self.members if m not in table]
        if missing:
            raise _bad_archive(self.path, f"{len(missing)} image(s) have no label in {META}, e.g. {missing[0]}",
                               "a labelled data set labels every image")
        values = [table[m] for m in self.members]
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
        if bad is not None:
            raise _bad_archive(self.path, f"{META} holds the label {bad!r}",
                               "genflow conditions on integer classes >= 0 (vector labels are not supported)")
        return values

    def open(self, member: str, verify: bool = False):
        from PIL import Image

        try:
            with self.zip.open(member) as f:
                img = Image.open(io.BytesIO(f.read()))
                if verify:
                    img.verify()
                else:
                    img.load()
            return img
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile, Image.DecompressionBombError) as err:
            raise config_error(f"cannot decode image {self.path}:{member}", f"{type(err).__name__}: {err}",
                               "rebuild the archive from intact images (genflow-dataset)") from err

    def check_layout(self) -> tuple[int, int]:
        """Every image decodable, all of one square size and one channel count (1 or 3), read from each
        image's header (PIL's structural check, no full decode); a bad image is named. Returns
        (resolution, channels)."""
        first = None
        for member in self.members:
            img = self.open(member, verify=True)
            channels = {"L": 1, "RGB": 3}.get(img.mode)
            if channels is None:
                raise _bad_archive(self.path, f"image {member} has mode {img.mode}",
                                   "EDM's archives hold grey (L) or RGB images")
            if img.size[0] != img.size[1]:
                raise _bad_archive(self.path, f"image {member} is {img.size[0]}x{img.size[1]}",
                                   "EDM's archives hold square images")
            if first is None:
                first = (img.size[0], channels, member)
            elif (img.size[0], channels) != first[:2]:
                raise _bad_archive(self.path, f"image {member} is {img.size[0]}px with {channels} channel(s), "
                                   f"{first[2]} is {first[0]}px with {first[1]}",
                                   "all images of a data set have one size and channel count")
        return first[0], first[1]

    def tensor(self) -> Tensor:
        """All images as uint8 (N, C, H, W), decoded straight from the archive."""
        import numpy as np

        arrays = []
        for member in self.members:
            a = np.asarray(self.open(member))
            arrays.append(a[:, :, None] if a.ndim == 2 else a)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class ImageZip(GenerativeDataModule):
    """EDM's data set archive (``data=zip data.path=cifar10-32x32.zip``): images in [-1, 1] at their native
    resolution (``resolution`` resizes bilinearly), class-conditional when the archive has labels
    (``conditional=null``, the default; ``false`` ignores them)."""

    feature_extractor = "inception"
    levels = 256

    def __init__(self, path: str | None = None, resolution: int | None = None, conditional: bool | None = None,
                 **kwargs):
        if path is None:
            raise config_error("data=zip needs data.path", "the zip data set reads one archive",
                               "pass data.path=/path/to/cifar10-32x32.zip (make one with genflow-dataset)")
        self.archive = ImageArchive(path)
        labelled = self.archive.labels is not None
        super().__init__(conditional=labelled if conditional is None else bool(conditional), **kwargs)
        self.path, self.resolution = self.archive.path, resolution
        self.name = self.archive.path.stem
        # known before setup, so a conditional net is built with its classes
        self._num_classes = max(self.archive.labels) + 1 if labelled else 0

    def examples(self) -> int:
        return len(self.archive.members)

    def verify(self) -> None:
        """Every image decodable and of one layout; a bad image is named. Run by train.py before the run."""
        self.archive.check_layout()

    def _load(self):
        x = self.archive.tensor().float() / 127.5 - 1
        if self.resolution is not None and self.resolution != x.shape[-1]:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True).clamp(-1, 1)
        labels = None if self.archive.labels is None else torch.tensor(self.archive.labels, dtype=torch.long)
        return x, labels


# --- writing ------------------------------------------------------------------------------------------
def write_archive(dest: str | Path, images: Iterable[tuple["object", int | None]], count: int,
                  progress: bool = False) -> dict:
    """Write (PIL image, label or None) pairs as EDM's archive at ``dest`` (atomically; an existing file is
    never replaced). Every image must already be square, a power of two wide, grey or RGB, all alike.
    Labels are written when every image has one. Returns a summary."""
    from genflow.outputs import write_output

    dest = Path(dest).expanduser()
    if dest.exists():
        raise config_error(f"dest={dest} exists", "genflow never overwrites a data set",
                           "choose another dest=, or remove the old archive first")
    summary: dict = {}

    def write(tmp: Path) -> None:
        labels, layout = [], None
        items: Iterator = iter(images)
        if progress:
            from genflow.progress import track

            items = track(items, total=count, description=f"writing {dest.name}")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for index, (img, label) in enumerate(items):
                name = member_name(index)
                channels = {"L": 1, "RGB": 3}.get(img.mode)
                width, height = img.size
                if channels is None or width != height or width & (width - 1):
                    raise config_error(f"image {index} is {width}x{height} {img.mode}",
                                       "EDM's archives hold square, power-of-two, grey or RGB images",
                                       "pass resolution=N (a power of two) to centre-crop and resize")
                if layout is None:
                    layout = (width, channels)
                elif layout != (width, channels):
                    raise config_error(f"image {index} is {width}px with {channels} channel(s), the first "
                                       f"{layout[0]}px with {layout[1]}",
                                       "all images of a data set have one size and channel count",
                                       "pass resolution=N to resize them alike")
                buffer = io.BytesIO()
                img.save(buffer, format="png", compress_level=0, optimize=False)
                zf.writestr(name, buffer.getvalue())
                labels.append([name, label])
            if layout is None:
                raise config_error("no images to write", "the source holds none", "check source=")
            labelled = all(label is not None for _, label in labels)
            zf.writestr(META, json.dumps({"labels": labels if labelled else None}))
        summary.update(images=len(labels), resolution=layout[0], channels=layout[1], labelled=labelled,
                       classes=len({label for _, label in labels}) if labelled else 0)

    write_output(dest, write)  # a full disk: an error naming dest, which is left as it was
    return {"dest": str(dest.absolute()), **summary}


def folder_images(root: Path, resolution: int | None = None, max_images: int | None = None):
    """(count, iterator of (PIL image, label)) for every image under ``root``, ordered by path; labels from
    top-level folder names (sorted) when there are two or more, as EDM's tool assigns them."""
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise config_error(f"no images under {root}", f"looked for {sorted(IMAGE_SUFFIXES)} files", "check source=")
    files = files[:max_images] if max_images else files
    tops = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
    classes = sorted(set(tops))
    labelled = len(classes) > 1

    def items():
        for path, top in zip(files, tops):
            try:
                img = Image.open(path)
                img.load()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise config_error(f"cannot decode image {path}", f"{type(err).__name__}: {err}",
                                   "remove or replace the file (source= is read recursively)") from err
            yield _fit(img, resolution), (classes.index(top) if labelled else None)

    return len(files), items()


class _ArrayUnpickler:
    """Reads CIFAR-10's python batches (pickled dicts of a uint8 array and a list of labels) resolving only
    numpy's array-building globals: nothing in the files decides what code runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # bytes in protocol-2 pickles written by Python 3 (a pure function)

    @classmethod
    def load(cls, path: Path):
        import importlib
        import pickle

        allowed = cls.ALLOWED

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in allowed:
                    raise config_error(f"{path} asks to load {module}.{name}",
                                       "a CIFAR-10 batch holds only arrays and lists; anything else is refused",
                                       "use the original cifar-10-python.tar.gz contents")
                return getattr(importlib.import_module(module), name)

        with open(path, "rb") as f:
            return Restricted(f, encoding="bytes").load()


def cifar10_images(root: Path, max_images: int | None = None):
    """(count, iterator of (PIL image, label)) of CIFAR-10's 50 000 training images in the order of its five
    batches (``root`` holds ``cifar-10-batches-py``; nothing downloads), as EDM's tool orders them."""
    import numpy as np
    from PIL import Image

    folder = root / "cifar-10-batches-py"
    arrays, labels = [], []
    for i in range(1, 6):
        path = folder / f"data_batch_{i}"
        if not path.is_file():
            raise config_error(f"{path} is missing", "CIFAR-10's training split is data_batch_1 ... data_batch_5",
                               "unpack cifar-10-python.tar.gz into the source folder")
        batch = _ArrayUnpickler.load(path)
        arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += [int(v) for v in batch[b"labels"]]
    data = np.concatenate(arrays)
    count = min(len(data), max_images) if max_images else len(data)
    return count, ((Image.fromarray(data[i]), labels[i]) for i in range(count))


def _fit(img, resolution: int | None):
    """Grey stays grey, everything else becomes RGB; with ``resolution``, centre-cropped to a square and
    resized (Lanczos)."""
    from PIL import Image

    img = img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB")
    if resolution is None:
        return img
    side = min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
