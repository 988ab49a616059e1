"""Non-leaky geometric augmentation with a conditioning label (EDM, Karras et al. 2022, Appendix F.2).

EDM (and PFGM++, which trains with EDM's code) augments every training image with probability p and
feeds the network a label describing what was done. At sampling the label is zero ("no augmentation"),
so the augmentations cannot leak into the generated distribution: the network learns p(x | aug) and
is asked for p(x | aug = identity). The recipe: ``AugmentPipe(p, xflip=1e8, yflip=1, scale=1,
rotate_frac=1, aniso=1, translate_frac=1)`` with p = 0.12 (CIFAR-10) or 0.15 (FFHQ-64), giving a
9-dimensional label in this order:

====================  ==========================================================================
label column(s)       transform (applied with probability min(1, multiplier * p) per sample)
====================  ==========================================================================
xflip                 w in {0, 1}: mirror left-right when w = 1 (so with xflip=1e8, half the images)
yflip                 w in {0, 1}: mirror top-bottom when w = 1
scale                 w ~ N(0, 1): isotropic zoom by 2^(w * scale_std)
rotate (2 columns)    w ~ U(-pi, pi) * rotate_frac_max: (cos w - 1, sin w)
aniso (2 columns)     w ~ N(0, 1), r ~ U(-pi, pi) (r = 0 with prob 1 - aniso_rotate_prob):
                      stretch by 2^(w * aniso_std) along the axis at angle r, squeeze across it;
                      label (w cos r, w sin r)
translate (2 columns) (wx, wy) ~ N(0, 1): shift by (wx * W, wy * H) * translate_frac_std pixels
====================  ==========================================================================

Flips are exact pixel permutations; the four geometric transforms compose into one affine map
per sample (zoom, then rotation, then anisotropic stretch, then shift, about the image centre in
pixel units, x right and y down), executed by a single ``affine_grid`` / ``grid_sample`` call.
Every parameter is zero when its transform is not applied, so the label row of an untouched image
is all zeros. A label column exists only for an enabled transform (multiplier > 0), as in EDM.

Differences from EDM's implementation (ours is written from its description, not its code):

* Resampling. EDM reflect-pads, upsamples 2x with a sym6 wavelet filter, samples bilinearly and
  filters back down (a near band-limited interpolator). We sample the original grid directly with
  ``grid_sample`` (bicubic by default, bilinear optional) and ``padding_mode="reflection"`` with
  ``align_corners=True``, which mirrors about the outermost pixel centres -- the same reflection
  as EDM's ``pad(mode="reflect")``. Here integer shifts and quarter turns are exact pixel moves (to
  float rounding of the sampling grid); in EDM integer shifts are exact, quarter turns nearly so.
  Bicubic keeps more fine detail than bilinear but, like EDM's filter, rings at sharp edges (a
  -1 -> 1 step overshoots to about 1.19; binary 8x8 digits reach 1.5); bilinear never leaves the
  input's range but blurs more. At a
  half-pixel offset white noise keeps 72 % of its variance with bicubic and 50 % with bilinear (an
  ideal band-limited interpolator, which EDM's filter approximates, keeps 100 %); smooth images,
  whose energy sits at low frequencies, lose almost nothing (see tests/test_augment.py).
* Reflection is unbounded here; EDM pads by at most W - 1 / H - 1 pixels and fills zeros beyond,
  which only matters for extreme zoom-outs (scale below ~1/2, a > 3.5 sigma draw).
* Randomness comes from ``torch.rand``/``randn`` on the images' device (an optional generator
  makes a call reproducible); images outside the geometric branch are returned bit-exactly.
* Colour transforms (unused by the EDM/PFGM++ recipe) and integer rotate/translate are omitted.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genflow.errors import config_error

#: parameter names of ``AugmentPipe.sample_params`` / ``apply`` (all shaped (B,), zero = not applied)
PARAM_NAMES = ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle", "translate_x", "translate_y")


def _rot(angle: Tensor) -> Tensor:
    """(B,) angles -> (B, 2, 2) rotation matrices [[c, -s], [s, c]] in (x right, y down) coordinates."""
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _diag(a: Tensor, b: Tensor) -> Tensor:
    z = torch.zeros_like(a)
    return torch.stack([torch.stack([a, z], -1), torch.stack([z, b], -1)], -2)


class AugmentPipe:
    """EDM's augmentation pipe (geometric part). ``pipe(x) -> (x_aug, labels)`` for images (B, C, H, W).

    ``p`` is the overall probability; each transform's probability is ``min(1, multiplier * p)``.
    ``AugmentPipe.edm(p)`` builds the EDM / PFGM++ recipe (9-dim label).
    """

    def __init__(self, p: float = 1.0, *, xflip: float = 0.0, yflip: float = 0.0, scale: float = 0.0,
                 rotate_frac: float = 0.0, aniso: float = 0.0, translate_frac: float = 0.0,
                 scale_std: float = 0.2, rotate_frac_max: float = 1.0, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125, interpolation: str = "bicubic"):
        if not 0.0 <= float(p) <= 1.0:
            raise config_error(f"augmentation probability p={p} is outside [0, 1]",
                               "it is the chance that each transform is applied to an image",
                               "use data.augment_p=0 (off) or a value such as 0.12 (EDM's CIFAR-10 setting)")
        knobs = dict(xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                     translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
                     aniso_std=aniso_std, translate_frac_std=translate_frac_std)
        for name, value in knobs.items():
            if not (float(value) >= 0.0 and math.isfinite(float(value))):
                raise config_error(f"AugmentPipe({name}={value}) is negative or not finite",
                                   "probability multipliers and standard deviations are non-negative numbers",
                                   f"set {name} to 0 (off) or a positive value")
        if not 0.0 <= float(aniso_rotate_prob) <= 1.0:
            raise config_error(f"AugmentPipe(aniso_rotate_prob={aniso_rotate_prob}) is outside [0, 1]",
                               "it is a probability", "use a value in [0, 1] (EDM uses 0.5)")
        if interpolation not in ("bicubic", "bilinear"):
            raise config_error(f"AugmentPipe(interpolation={interpolation!r}) is not supported",
                               "the geometric transforms resample the image with grid_sample",
                               "use interpolation='bicubic' (default, closer to EDM's filter) or 'bilinear'")
        self.p = float(p)
        self.xflip, self.yflip, self.scale = float(xflip), float(yflip), float(scale)
        self.rotate_frac, self.aniso, self.translate_frac = float(rotate_frac), float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max, self.aniso_std = float(scale_std), float(rotate_frac_max), float(aniso_std)
        self.aniso_rotate_prob, self.translate_frac_std = float(aniso_rotate_prob), float(translate_frac_std)
        self.interpolation = interpolation

    @classmethod
    def edm(cls, p: float, **overrides) -> "AugmentPipe":
        """The EDM / PFGM++ training recipe: flips, zoom, rotation, anisotropy, translation (9-dim label)."""
        knobs = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        knobs.update(overrides)
        return cls(p, **knobs)

    # --- label layout ------------------------------------------------------------------------
    @property
    def label_names(self) -> tuple[str, ...]:
        names: list[str] = []
        if self.xflip > 0:
            names.append("xflip")
        if self.yflip > 0:
            names.append("yflip")
        if self.scale > 0:
            names.append("scale")
        if self.rotate_frac > 0:
            names += ["rotate_cos_m1", "rotate_sin"]
        if self.aniso > 0:
            names += ["aniso_cos", "aniso_sin"]
        if self.translate_frac > 0:
            names += ["translate_x", "translate_y"]
        return tuple(names)

    @property
    def label_dim(self) -> int:
        """Width of the label; a network conditioned on it needs ``augment_dim`` equal to this."""
        return len(self.label_names)

    @property
    def _geometric(self) -> bool:
        return self.scale > 0 or self.rotate_frac > 0 or self.aniso > 0 or self.translate_frac > 0

    # --- sampling ----------------------------------------------------------------------------
    def sample_params(self, n: int, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draw per-sample parameters (each (n,) float32 on ``device``; zero where not applied)."""
        kw = dict(device=device, dtype=torch.float32, generator=generator)
        zero = torch.zeros(n, device=device)

        def gate(multiplier: float, value: Tensor) -> Tensor:
            # one Bernoulli(min(1, multiplier * p)) draw per sample decides whether the transform happens
            if multiplier <= 0:
                return zero
            return torch.where(torch.rand(n, **kw) < multiplier * self.p, value, zero)

        out = {k: zero for k in PARAM_NAMES}
        if self.p == 0:
            return out
        if self.xflip > 0:
            out["xflip"] = gate(self.xflip, (torch.rand(n, **kw) < 0.5).float())
        if self.yflip > 0:
            out["yflip"] = gate(self.yflip, (torch.rand(n, **kw) < 0.5).float())
        if self.scale > 0:
            out["scale"] = gate(self.scale, torch.randn(n, **kw))
        if self.rotate_frac > 0:
            out["rotate"] = gate(self.rotate_frac, (torch.rand(n, **kw) * 2 - 1) * (math.pi * self.rotate_frac_max))
        if self.aniso > 0:
            out["aniso"] = gate(self.aniso, torch.randn(n, **kw))
            r = (torch.rand(n, **kw) * 2 - 1) * math.pi
            # the stretch axis is tilted only part of the time, independently of whether aniso applies
            out["aniso_angle"] = torch.where(torch.rand(n, **kw) < self.aniso_rotate_prob, r, zero)
        if self.translate_frac > 0:
            w = torch.randn(2, n, **kw)
            w = torch.where(torch.rand(n, **kw) < self.translate_frac * self.p, w, zero)
            out["translate_x"], out["translate_y"] = w[0], w[1]
        return out

    @staticmethod
    def _complete(params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fill parameters a caller left out with zeros ("not applied"); reject unknown names."""
        unknown = set(params) - set(PARAM_NAMES)
        if unknown or not params:
            raise ValueError(f"augmentation parameters must be a non-empty subset of {PARAM_NAMES}, got {sorted(params)}")
        ref = next(iter(params.values()))
        return {k: params[k].float() if k in params else torch.zeros(ref.shape[0], device=ref.device)
                for k in PARAM_NAMES}

    def labels(self, params: dict[str, Tensor]) -> Tensor:
        """(B, label_dim) float32 conditioning label for the given parameters (EDM's layout)."""
        params = self._complete(params)
        n = params["xflip"].shape[0]
        cols: list[Tensor] = []
        if self.xflip > 0:
            cols.append(params["xflip"])
        if self.yflip > 0:
            cols.append(params["yflip"])
        if self.scale > 0:
            cols.append(params["scale"])
        if self.rotate_frac > 0:
            w = params["rotate"]
            cols += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w, r = params["aniso"], params["aniso_angle"]
            cols += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            cols += [params["translate_x"], params["translate_y"]]
        if not cols:
            return torch.zeros(n, 0, device=params["xflip"].device)
        return torch.stack(cols, dim=1).float()

    # --- execution ---------------------------------------------------------------------------
    def source_map(self, params: dict[str, Tensor], height: int, width: int) -> tuple[Tensor, Tensor]:
        """Output pixel -> source pixel map ``src = M @ (dst - t)`` in centred pixel coordinates.

        Returns M (B, 2, 2) and t (B, 2). Forward (source -> output) order: zoom, rotation,
        anisotropic stretch, shift; M is the inverse of the linear part.
        """
        params = self._complete(params)
        zoom = torch.exp2(params["scale"] * self.scale_std)
        stretch = torch.exp2(params["aniso"] * self.aniso_std)
        r = params["aniso_angle"]
        m = _diag(1 / zoom, 1 / zoom) @ _rot(params["rotate"]) @ _rot(-r) @ _diag(1 / stretch, stretch) @ _rot(r)
        t = torch.stack([params["translate_x"] * (width * self.translate_frac_std),
                         params["translate_y"] * (height * self.translate_frac_std)], dim=1)
        return m, t

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Apply the transforms described by ``params`` (from ``sample_params``) to images x (B, C, H, W)."""
        self._check(x)
        n, _, h, w = x.shape
        params = {k: v.to(x.device) for k, v in self._complete(params).items()}
        flip = params["xflip"].view(n, 1, 1, 1) != 0
        x = torch.where(flip, x.flip(3), x)
        flip = params["yflip"].view(n, 1, 1, 1) != 0
        x = torch.where(flip, x.flip(2), x)
        if not self._geometric:
            return x
        m, t = self.source_map(params, h, w)
        # normalised coordinates with align_corners=True: pixel centre 0 -> -1, W-1 -> +1, i.e.
        # p = N u with N = diag(hx, hy); theta = [N^-1 M N | -N^-1 M t]. Python scalars only: a host
        # tensor copied to the GPU here would synchronise every training step.
        hx, hy = (w - 1) / 2, (h - 1) / 2
        mt = (m @ t[:, :, None])[:, :, 0]
        theta = torch.stack([
            torch.stack([m[:, 0, 0], m[:, 0, 1] * (hy / hx), -mt[:, 0] / hx], dim=1),
            torch.stack([m[:, 1, 0] * (hx / hy), m[:, 1, 1], -mt[:, 1] / hy], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        moved = F.grid_sample(x, grid.to(x.dtype), mode=self.interpolation, padding_mode="reflection",
                              align_corners=True)
        # untouched images stay bit-exact (resampling with the identity map rounds at the 1e-7 level)
        active = (params["scale"] != 0) | (params["rotate"] != 0) | (params["aniso"] != 0) \
            | (params["translate_x"] != 0) | (params["translate_y"] != 0)
        return torch.where(active.view(n, 1, 1, 1), moved, x)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise config_error(f"augmentation got a batch of shape {tuple(x.shape)}",
                               "the augmentation pipe transforms images shaped (B, C, H, W)",
                               "set data.augment_p=0 for non-image data")
        if self._geometric and (x.shape[2] < 2 or x.shape[3] < 2):
            raise config_error(f"augmentation got {x.shape[2]}x{x.shape[3]} images",
                               "geometric transforms need at least 2 pixels per side",
                               "set data.augment_p=0 for such data")

    @torch.no_grad()
    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Augment a batch: returns (x_aug (B, C, H, W), labels (B, label_dim) float32), both on x's device.

        ``generator`` (on x's device) makes the draw reproducible; by default the global RNG is used,
        so checkpointed RNG state also replays augmentations on resume.
        """
        self._check(x)
        if self.p == 0:
            return x, torch.zeros(x.shape[0], self.label_dim, device=x.device)
        params = self.sample_params(x.shape[0], x.device, generator)
        return self.apply(x, params), self.labels(params)

    def __repr__(self) -> str:
        on = ", ".join(f"{k}={getattr(self, k):g}" for k in ("xflip", "yflip", "scale", "rotate_frac", "aniso",
                                                             "translate_frac") if getattr(self, k) > 0)
        return f"AugmentPipe(p={self.p:g}, {on}, interpolation={self.interpolation!r})"
