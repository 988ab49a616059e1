"""Multi-view data for Isotropic3D: a procedural toy set (no download) and a folder of real renders.

Each example is V target views of one object, ``x`` (V, 3, R, R) in [-1, 1], with ``cond``:

* ``camera`` (V, 4, 4): camera-to-world matrices, z-up world, OpenGL camera axes, unit translation
  (``genflow.data.render`` documents the convention);
* ``image_emb`` (E,): the embedding of the reference image by the configured encoder;
* ``reference`` (3, R, R) and ``reference_camera`` (4, 4): the reference view and its pose (used by
  the net from stage 2 on; stage 1 ignores them).

Toy set (``root: null``): boxes with random half extents and 6 face colours
(``genflow.data.render``), targets at azimuths a0 + k 360/V (a0 uniform per object) at one elevation
drawn from ``elevation_range``; the reference is its own render, at a random pose (``reference_pose:
random``) or at the front pose (``front``: azimuth 0 at the middle of the elevation range), never one
of the target views (a copy of a target would let the net copy it instead of learning the object). The default ``stats`` encoder is lossy on purpose: it keeps the mean
colour and silhouette, so the per-face colours are only in the reference view's pixels.

Folder format (``root: /path``)::

    root/<object_id>/cameras.json
    root/<object_id>/<image files>

    cameras.json = {"views": [{"file": "000.png", "c2w": [[4 floats] x 4]}, ...],
                    "reference": {"file": "ref.png", "c2w": [[...]]}}      # a separate render

``c2w`` is camera-to-world in the convention above (Blender: z up, camera looks down its -z); the
translation is rescaled to unit length on load. Every object needs at least ``views`` views (the
first ``views`` are used) and a "reference" entry, a separate render (an object without one is an
error: using a target view as the reference would let the net copy that target). RGBA images
are composited on white; all images are resized to ``resolution``.

``inference_cond`` builds the sampling condition from a reference PNG or a saved embedding and
``save_views`` writes generated views side by side next to the reference.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from genflow.data.base import GenerativeDataModule, Preloaded
from genflow.data.render import camera_to_world, get_camera, normalize_camera, random_boxes, render_boxes
from genflow.errors import config_error
from genflow.nets.encoders import build_encoder, check_encoder

__all__ = ["MultiView", "inference_cond", "load_reference_image", "save_views", "encode_images"]

REFERENCE_POSES = ("random", "front")


class MultiViewPairs(Preloaded):
    """(views_i, {"camera", "image_emb", "reference", "reference_camera"}) over preloaded tensors."""

    def __init__(self, data: Mapping[str, Tensor], index: Tensor):
        self.x = data["x"][index]
        self.cond = {k: data[k][index] for k in ("camera", "image_emb", "reference", "reference_camera")}

    def __getitems__(self, indices: list[int]):
        """A whole batch in one indexing op per tensor."""
        idx = self.batch_index(indices)
        return self.x[idx], {k: v[idx] for k, v in self.cond.items()}


def encode_images(encoder, images: Tensor, batch: int = 256) -> Tensor:
    """Embed (N, C, H, W) images in chunks without gradients -> (N, E) float32."""
    with torch.no_grad():
        return torch.cat([encoder(images[i:i + batch]).float() for i in range(0, images.shape[0], batch)])


class MultiView(GenerativeDataModule):
    """V-view objects with cameras, a reference view and its embedding (see the module docstring)."""

    feature_extractor = "none"  # Inception FID does not apply to (V, C, H, W); use scripts/isotropic3d_consistency.py
    name = "multiview"

    def __init__(self, root: str | None = None, views: int = 4, resolution: int = 16, num_objects: int = 512,
                 elevation_range=(0.0, 30.0), reference_pose: str = "random", distance: float = 2.4,
                 fov: float = 50.0, toy_seed: int = 0, encoder: Mapping | None = None,
                 inference: Mapping | None = None, **kwargs):
        super().__init__(**kwargs)
        if views < 1:
            raise config_error(f"data.views={views}", "each object needs at least one target view", "set data.views >= 1")
        if reference_pose == "view0":
            raise config_error("data.reference_pose=view0 makes the reference a copy of target view 0",
                               "stage 2 would learn to copy that target from the reference frame instead of "
                               "generating it; Isotropic3D's reference is a separate render",
                               "use data.reference_pose=random or front")
        if reference_pose not in REFERENCE_POSES:
            raise config_error(f"data.reference_pose={reference_pose!r}", f"choose from {REFERENCE_POSES}",
                               "set data.reference_pose=random (a random pose) or front (azimuth 0)")
        if root is not None and not Path(root).expanduser().is_dir():
            raise config_error(f"data.root={root} is not a folder", "data=multiview reads per-object folders there",
                               "point data.root at the folder of object folders (see genflow/data/multiview.py), "
                               "or set data.root=null for the bundled toy set")
        lo, hi = elevation_range
        if not -90 < lo <= hi < 90:
            raise config_error(f"data.elevation_range={list(elevation_range)}", "elevations must be ordered, in (-90, 90)",
                               "use e.g. [0, 30]")
        self.root = Path(root).expanduser() if root is not None else None
        self.views, self.resolution, self.num_objects = views, resolution, num_objects
        self.elevation_range, self.reference_pose = (float(lo), float(hi)), reference_pose
        self.distance, self.fov, self.toy_seed = distance, fov, toy_seed
        self.encoder_cfg = dict(encoder or {"name": "stats"})
        self.inference = dict(inference or {})
        self._all: dict[str, Tensor] | None = None
        self._encoder = None

    def verify(self) -> None:
        """The image encoder's needs (name, local weights file, package), checked without building it; run by
        train.py before the run starts."""
        check_encoder(**self.encoder_cfg)

    # ------------------------------------------------------------------------------------------
    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = build_encoder(**self.encoder_cfg)
        return self._encoder

    @property
    def embedding_dim(self) -> int:
        return self.encoder.dim

    def toy_objects(self) -> dict[str, Tensor]:
        """Render the toy set: x, camera, reference, reference_camera (+ box parameters half, colors)."""
        n, v = self.num_objects, self.views
        g = torch.Generator().manual_seed(self.toy_seed)
        half, colors = random_boxes(n, g)
        lo, hi = self.elevation_range
        a0 = torch.rand(n, 1, generator=g) * 360
        elev = lo + (hi - lo) * torch.rand(n, 1, generator=g)
        azim = a0 + torch.arange(v) * (360.0 / v)
        cams = camera_to_world(elev.expand(n, v), azim).float()
        if self.reference_pose == "front":
            ref_cam = camera_to_world(torch.full((n,), 0.5 * (lo + hi)), torch.zeros(n)).float()
        else:
            ref_cam = camera_to_world(lo + (hi - lo) * torch.rand(n, generator=g),
                                      torch.rand(n, generator=g) * 360).float()
        imgs = render_boxes(half, colors, torch.cat([cams, ref_cam[:, None]], dim=1), resolution=self.resolution,
                            distance=self.distance, fov=self.fov)
        return {"x": imgs[:, :v].contiguous(), "camera": cams, "reference": imgs[:, v].contiguous(),
                "reference_camera": ref_cam, "half": half, "colors": colors}

    def folder_objects(self) -> dict[str, Tensor]:
        objects = sorted(p.parent for p in self.root.glob("*/cameras.json"))
        if not objects:
            raise config_error(f"no <object>/cameras.json under {self.root}",
                               "data=multiview with a root reads one folder per object", "see the folder format in "
                               "genflow/data/multiview.py, or set data.root=null for the toy set")
        xs, cams, refs, ref_cams = [], [], [], []
        for obj in objects:
            meta = json.loads((obj / "cameras.json").read_text())
            entries = meta.get("views", [])
            if len(entries) < self.views:
                raise config_error(f"{obj} has {len(entries)} views, data.views={self.views}",
                                   "every object must provide the same number of target views",
                                   "render more views or lower data.views")
            entries = entries[: self.views]
            ref = meta.get("reference")
            if not ref:
                raise config_error(f"{obj / 'cameras.json'} has no \"reference\" entry",
                                   "the stage-2 reference must be a separate render: a target view used as the "
                                   "reference lets the net copy that target",
                                   'add "reference": {"file": "ref.png", "c2w": [[...]]}, rendered from a pose '
                                   "that is not one of the target views")
            xs.append(torch.cat([load_reference_image(obj / e["file"], self.resolution) for e in entries]))
            cams.append(torch.tensor([e["c2w"] for e in entries], dtype=torch.float32))
            refs.append(load_reference_image(obj / ref["file"], self.resolution)[0])
            ref_cams.append(torch.tensor(ref["c2w"], dtype=torch.float32))
        cam, ref_cam = torch.stack(cams), torch.stack(ref_cams)
        if cam.shape[-2:] != (4, 4) or ref_cam.shape[-2:] != (4, 4):
            raise config_error("camera matrices in cameras.json are not 4x4", "c2w must be a 4x4 camera-to-world matrix",
                               "write each c2w as 4 rows of 4 numbers")
        return {"x": torch.stack(xs), "camera": normalize_camera(cam), "reference": torch.stack(refs),
                "reference_camera": normalize_camera(ref_cam)}

    def all_objects(self) -> dict[str, Tensor]:
        if self._all is None:
            data = self.toy_objects() if self.root is None else self.folder_objects()
            data["image_emb"] = encode_images(self.encoder, data["reference"])
            self._all = data
        return self._all

    def _load(self):
        return self.all_objects()["x"], None

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        data = self.all_objects()
        n = data["x"].shape[0]
        # the same fixed permutation as the base class keeps the held-out objects identical across runs
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
        n_val = int(round(self.val_fraction * n))
        self.val_index, self.train_index = perm[:n_val], perm[n_val:]
        self._train = MultiViewPairs(data, self.train_index)
        self._val = MultiViewPairs(data, self.val_index)

    def train_cond(self) -> dict[str, Tensor]:
        self.setup()
        return self._train.cond

    def val_cond(self) -> dict[str, Tensor]:
        self.setup()
        return self._val.cond

    def train_labels(self):
        return None

    def sample_cond(self, seeds, device=None) -> dict[str, Tensor]:
        """Condition for seed i: held-out object i mod n_val (its embedding and target cameras only,
        the inference setting of the paper)."""
        cond = self.val_cond() if len(self._val) else self.train_cond()
        idx = torch.as_tensor(list(seeds)) % cond["camera"].shape[0]
        return {k: cond[k][idx].to(device) for k in ("camera", "image_emb")}

    def reference_cond(self, reference: str | Path, seeds, device=None) -> dict[str, Tensor]:
        """Condition for every seed from a user's reference image or embedding (``sample.py reference=``)."""
        data = {"views": self.views, "resolution": self.resolution, "inference": self.inference,
                "encoder": self.encoder_cfg}
        return inference_cond(reference, data, device, num=len(list(seeds)))

    def save_reference_grid(self, path: str | Path, samples: Tensor, reference: str | Path) -> Path:
        """One row per seed: the reference image (an image file; an embedding has none), then the views."""
        image = None
        if Path(str(reference)).suffix.lower() not in (".pt", ".pth", ".npy"):
            image = load_reference_image(reference, samples.shape[-1])
        return save_views(path, samples, image)


# --------------------------------------------------------------------------------------------- I/O
def load_reference_image(path: str | Path, resolution: int) -> Tensor:
    """A PNG/JPG as (1, 3, R, R) in [-1, 1]; RGBA is composited on white, non-square images are centre-cropped."""
    from PIL import Image
    import torchvision.transforms.functional as TF

    path = Path(path).expanduser()
    if not path.is_file():
        raise config_error(f"image {path} does not exist", "it was given as a view or reference image",
                           "check the path")
    img = Image.open(path)
    img = img.convert("RGBA") if img.mode in ("RGBA", "LA", "P") else img.convert("RGB")
    side = min(img.size)
    img = TF.center_crop(img, [side, side])
    x = TF.pil_to_tensor(img).float()[None] / 127.5 - 1
    if x.shape[1] == 4:
        alpha = (x[:, 3:] + 1) / 2
        x = x[:, :3] * alpha + (1 - alpha)
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1, 1)


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def inference_cond(reference: str | Path, cfg_data, device=None, *, num: int = 1,
                   with_reference: bool = False) -> dict[str, Tensor]:
    """Sampling condition from a reference image (.png/.jpg) or a saved embedding (.pt/.npy).

    Returns ``camera`` (num, V, 4, 4) from ``get_camera`` (``data.inference``: elevation,
    azimuth_start, camera_compat) and ``image_emb`` (num, E); with ``with_reference`` (an image only)
    also ``reference`` and ``reference_camera`` (the pose ``data.inference.reference_elevation`` /
    ``reference_azimuth``). Isotropic3D samples with the embedding and cameras only (the default).
    """
    path = Path(str(reference)).expanduser()
    if not path.is_file():
        raise config_error(f"reference={path} does not exist", "sampling needs a reference image or embedding file",
                           "pass reference=IMAGE.png, or an embedding saved as .pt / .npy")
    views = int(_get(cfg_data, "views", 4))
    resolution = int(_get(cfg_data, "resolution", 16))
    inf = _get(cfg_data, "inference", {}) or {}
    enc_cfg = dict(_get(cfg_data, "encoder", {"name": "stats"}))
    image = None
    if path.suffix.lower() in (".pt", ".pth", ".npy"):
        if path.suffix.lower() == ".npy":
            import numpy as np

            emb = torch.from_numpy(np.load(path)).float()
        else:
            emb = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(emb, Mapping):
                emb = emb.get("image_emb")
            if not isinstance(emb, Tensor):
                raise config_error(f"{path} holds no tensor", "an embedding file is a tensor (E,) or (1, E), "
                                   "or a dict with key 'image_emb'", "save it with torch.save(emb, path)")
            emb = emb.float()
        emb = emb.reshape(1, -1)
        dim = enc_cfg.get("dim")
        if dim is not None and emb.shape[1] != int(dim):
            raise config_error(f"embedding in {path} has {emb.shape[1]} values", f"the model expects data.encoder.dim={dim}",
                               "embed the reference with the same encoder the model was trained with")
        if with_reference:
            raise config_error("with_reference needs a reference image", f"{path} is an embedding file",
                               "pass the reference PNG instead")
    else:
        image = load_reference_image(path, resolution)
        emb = encode_images(build_encoder(**enc_cfg), image)
    cams = get_camera(views, elevation=float(_get(inf, "elevation", 15.0)),
                      azimuth_start=float(_get(inf, "azimuth_start", 0.0)), compat=_get(inf, "camera_compat", None))
    cond = {"camera": repeat(cams, "v i j -> n v i j", n=num).contiguous(),
            "image_emb": repeat(emb, "1 e -> n e", n=num).contiguous()}
    if with_reference:
        ref_cam = camera_to_world(torch.tensor(float(_get(inf, "reference_elevation", 15.0))),
                                  torch.tensor(float(_get(inf, "reference_azimuth", 0.0)))).float()
        cond["reference"] = repeat(image, "1 c h w -> n c h w", n=num).contiguous()
        cond["reference_camera"] = repeat(normalize_camera(ref_cam), "i j -> n i j", n=num).contiguous()
    return {k: v.to(device) for k, v in cond.items()}


def save_views(path: str | Path, views: Tensor, reference: Tensor | None = None, pad: int = 2) -> Path:
    """Write one row per object: [reference | view 0 | ... | view V-1] (images in [-1, 1]).

    ``views`` (N, V, C, H, W); ``reference`` (C, H, W), (1, C, H, W) or (N, C, H, W), or None.
    """
    import torchvision

    views = views.detach().float().cpu().clamp(-1, 1)
    n, v = views.shape[:2]
    rows = views
    if reference is not None:
        ref = reference.detach().float().cpu().clamp(-1, 1)
        ref = ref.reshape(-1, *views.shape[2:]).expand(n, -1, -1, -1)
        rows = torch.cat([rearrange(ref, "n c h w -> n 1 c h w"), views], dim=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image((rearrange(rows, "n v c h w -> (n v) c h w") + 1) / 2, str(path), nrow=rows.shape[1],
                                 padding=pad, pad_value=1.0)
    return path
