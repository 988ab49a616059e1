"""Cameras and a tiny analytic renderer for the procedural multi-view toy set (Isotropic3D miniature).

Camera convention (MVDream's, Shi et al. 2023, which Isotropic3D, Liu et al. 2024, inherits):

* a camera at elevation e and azimuth a looks at the origin from the unit sphere; in the y-up
  (OpenGL) world its position is (cos e sin a, sin e, cos e cos a);
* the camera-to-world matrix has columns [right, up, back] (OpenGL camera axes: x right, y up,
  looking down -z), built with world-up +y;
* the matrix is then expressed in the z-up (Blender) world by left-multiplying the y/z flip
  [[1,0,0],[0,0,-1],[0,1,0]], so the position becomes (cos e sin a, -cos e cos a, sin e);
* the translation is normalised to unit length (the network sees rotation + viewing direction only).

``get_camera`` converts degrees to radians exactly once. ``compat="isotropic3d"`` reproduces the
released Isotropic3D code, which converts twice and re-converts the elevation on every loop
iteration (its 4 inference cameras collapse to within ~5 deg of azimuth); use it only to drive the
released weights.

The renderer ray-casts axis-aligned boxes (slab test) with one flat colour per face, a fixed
directional light and a white background, supersampled 2x2. Everything is batched torch code.
"""
from __future__ import annotations

import math

import torch
from einops import einsum, rearrange
from torch import Tensor

from genflow.errors import config_error

__all__ = ["camera_to_world", "get_camera", "normalize_camera", "render_boxes", "random_boxes", "FACE_NORMALS"]

# Blender (z-up) world from OpenGL (y-up) world.
_GL_TO_BLENDER = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)

#: outward normals of the 6 faces, in face-index order (-x, +x, -y, +y, -z, +z)
FACE_NORMALS = torch.tensor([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], dtype=torch.float32)


def camera_to_world(elevation: Tensor, azimuth: Tensor, *, radians: bool = False, blender: bool = True) -> Tensor:
    """Unit-distance look-at-origin camera-to-world matrices, shape (..., 4, 4), float64.

    ``elevation`` and ``azimuth`` are broadcastable tensors, in degrees unless ``radians``.
    """
    e = torch.as_tensor(elevation, dtype=torch.float64)
    a = torch.as_tensor(azimuth, dtype=torch.float64)
    e, a = torch.broadcast_tensors(e, a)
    if not radians:
        e, a = torch.deg2rad(e), torch.deg2rad(a)
    pos = torch.stack([e.cos() * a.sin(), e.sin(), e.cos() * a.cos()], dim=-1)
    forward = -pos  # towards the origin; already unit length
    up_world = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(forward)
    right = torch.linalg.cross(forward, up_world)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward)
    up = up / up.norm(dim=-1, keepdim=True)
    rot = torch.stack([right, up, -forward], dim=-1)  # columns
    if blender:
        rot = _GL_TO_BLENDER @ rot
        pos = pos @ _GL_TO_BLENDER.T
    c2w = torch.zeros(*e.shape, 4, 4, dtype=torch.float64)
    c2w[..., :3, :3] = rot
    c2w[..., :3, 3] = pos
    c2w[..., 3, 3] = 1.0
    return c2w


def normalize_camera(c2w: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale the translation of (..., 4, 4) camera-to-world matrices to unit length (zeros stay zero)."""
    t = c2w[..., :3, 3]
    out = c2w.clone()
    out[..., :3, 3] = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    return out


def get_camera(num_views: int, elevation: float = 15.0, azimuth_start: float = 0.0, azimuth_span: float = 360.0,
               *, compat: str | None = None, blender: bool = True) -> Tensor:
    """Cameras for ``num_views`` azimuths ``azimuth_start + k * span / num_views`` at one elevation.

    Returns (num_views, 4, 4) float32 camera-to-world matrices with unit translation.
    ``compat="isotropic3d"`` reproduces the released code's double degree->radian conversion.
    """
    if num_views < 1:
        raise config_error(f"num_views={num_views}", "at least one camera is needed", "pass num_views >= 1")
    step = azimuth_span / num_views
    azimuths = [azimuth_start + k * step for k in range(num_views)]
    if compat is None:
        c2w = camera_to_world(torch.full((num_views,), float(elevation)), torch.tensor(azimuths), blender=blender)
    elif compat == "isotropic3d":
        # Released get_camera: the loop variable is converted to radians and then treated as degrees
        # by the matrix builder; the elevation variable is overwritten, so it shrinks every iteration.
        mats, e = [], float(elevation)
        for a in azimuths:
            e = math.radians(e)
            mats.append(camera_to_world(torch.tensor(e), torch.tensor(math.radians(a)), blender=blender))
        c2w = torch.stack(mats)
    else:
        raise config_error(f"camera compat mode {compat!r} is unknown", "only the released Isotropic3D quirk is modelled",
                           "use compat=null (correct cameras) or compat=isotropic3d (released weights only)")
    return normalize_camera(c2w).float()


def random_boxes(n: int, generator: torch.Generator | None = None, half_extent=(0.3, 0.8)) -> tuple[Tensor, Tensor]:
    """``n`` random boxes: half extents (n, 3) uniform in ``half_extent`` and face colours (n, 6, 3) in [0, 1]."""
    lo, hi = half_extent
    half = lo + (hi - lo) * torch.rand(n, 3, generator=generator)
    colors = torch.rand(n, 6, 3, generator=generator)
    return half, colors


def render_boxes(half: Tensor, colors: Tensor, c2w: Tensor, *, resolution: int = 16, distance: float = 2.4,
                 fov: float = 50.0, light=(0.3, -0.5, 0.8), supersample: int = 2) -> Tensor:
    """Render boxes centred at the origin, one per object, from cameras ``c2w`` (n, V, 4, 4).

    The cameras' translations are rescaled to ``distance``; ``fov`` is the full vertical field of
    view in degrees. Returns (n, V, 3, resolution, resolution) in [-1, 1] on a white background.
    """
    n, v = c2w.shape[:2]
    r = resolution * supersample
    c2w = c2w.to(torch.float32)
    half = half.to(torch.float32)
    tan = math.tan(math.radians(fov) / 2)
    # pixel centres; row 0 is the top of the image (+y in camera space)
    coords = (torch.arange(r, dtype=torch.float32) + 0.5) / r * 2 - 1
    yy, xx = torch.meshgrid(-coords, coords, indexing="ij")
    d_cam = torch.stack([xx * tan, yy * tan, -torch.ones_like(xx)], dim=-1)  # (r, r, 3)
    rot = c2w[..., :3, :3]
    origin = c2w[..., :3, 3]
    origin = origin / origin.norm(dim=-1, keepdim=True).clamp_min(1e-8) * distance  # (n, V, 3)
    dirs = einsum(rot, d_cam, "n v i j, h w j -> n v h w i")
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    o = origin[:, :, None, None, :]
    h = half[:, None, None, None, :]
    # slab test; IEEE division gives +-inf for axis-parallel rays, which the min/max handle
    inv = 1.0 / dirs
    t1, t2 = (-h - o) * inv, (h - o) * inv
    t_lo, t_hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = t_lo.max(dim=-1)
    t_far = t_hi.min(dim=-1).values
    hit = (t_near < t_far) & (t_far > 0)
    # entering through the -axis face when the ray travels along +axis
    d_axis = dirs.gather(-1, axis[..., None]).squeeze(-1)
    face = axis * 2 + (d_axis < 0).long()
    col = torch.gather(colors.to(torch.float32)[:, None, None, None].expand(n, v, r, r, 6, 3), 4,
                       face[..., None, None].expand(n, v, r, r, 1, 3)).squeeze(4)
    light_dir = torch.tensor(light, dtype=torch.float32)
    light_dir = light_dir / light_dir.norm()
    shade = 0.55 + 0.45 * (FACE_NORMALS @ light_dir).clamp_min(0)  # per face
    col = col * shade[face][..., None]
    img = torch.where(hit[..., None], col, torch.ones_like(col))  # white background
    img = rearrange(img, "n v h w c -> (n v) c h w")
    if supersample > 1:
        img = torch.nn.functional.avg_pool2d(img, supersample)
    return rearrange(img * 2 - 1, "(n v) c h w -> n v c h w", n=n)
