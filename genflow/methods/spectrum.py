"""The image power spectrum that shortest-path diffusion (``genflow.methods.spd``) is built on: estimated
from data, fitted by a radial power law, and cached on disk by data hash (``genflow.cache``).

- Empirical table P_c(k) = mean_n |fft2_ortho(x_n,c)_k|^2                  -> ``empirical_spectrum``
- Radial power law S(k) = c1 / (c2 + |k|)^m fitted to its radial bins      -> ``fit_power_law``,
  ``power_law_spectrum`` (reference constants c1 = 1.59, c2 = 0.0086, m = 2)
- Either one, floored and cached                                           -> ``estimate_spectrum``
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from genflow.cache import cache_dir, cached, content_hash
from genflow.errors import config_error

#: bumps the on-disk cache key when the estimator changes
_CACHE_VERSION = "spd-spectrum-v1"


def radial_frequency(H: int, W: int, device=None) -> Tensor:
    """|k| = sqrt(kx^2 + ky^2) on the FFT grid, integer frequencies in cycles per image, (H, W) float64."""
    ky = torch.fft.fftfreq(H, d=1.0 / H, dtype=torch.float64, device=device)
    kx = torch.fft.fftfreq(W, d=1.0 / W, dtype=torch.float64, device=device)
    return (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt()


def power_law_spectrum(c1: float, c2: float, m: float, H: int, W: int, device=None) -> Tensor:
    """S(k) = c1 / (c2 + |k|)^m on the (H, W) FFT grid, float64 (the reference's radial model)."""
    return c1 / (c2 + radial_frequency(H, W, device)) ** m


def _negated(S: Tensor) -> Tensor:
    """S(-k): index i -> (-i) mod N along both spatial axes (the Nyquist bin maps to itself)."""
    return torch.roll(torch.flip(S, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


def empirical_spectrum(images: Tensor, chunk: int = 2048) -> Tensor:
    """P_c(k) = mean_n |fft2_ortho(x_{n,c})_k|^2, (C, H, W) float64; the DC bin keeps the mean (a
    second moment, which is what the geodesic's marginal variance S_k^(1-s) refers to)."""
    if images.ndim != 4:
        raise config_error(f"images of shape {tuple(images.shape)} are not (N, C, H, W)",
                           "the SPD spectrum is a per-channel 2-D Fourier power spectrum",
                           "pass a batch of images shaped (N, C, H, W)")
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):  # bounded memory for large datasets
        x = images[start:start + chunk].detach().to("cpu", torch.float64)
        total += torch.fft.fft2(x, norm="ortho").abs().square().sum(0)
    return total / images.shape[0]


def fit_power_law(P: Tensor) -> Tensor:
    """Least-squares fit of log Pbar(r) = log c1 - m log(c2 + r) over the radial bins r = |k| of a
    (C, H, W) (or (H, W)) power spectrum, one (c1, c2, m) per channel -> (C, 3) float64.

    Every distinct radius is one point (unweighted), so the DC bin, which alone pins c2 when
    c2 << 1, counts as much as any ring. For fixed c2 the fit is linear in (log c1, m); c2 is found
    by a log-spaced scan and golden-section refinement of the profile residual."""
    P = P.to(torch.float64)
    if P.ndim == 2:
        P = P[None]
    r = radial_frequency(*P.shape[-2:]).flatten()
    radii, inverse = torch.unique(r, return_inverse=True)
    counts = torch.bincount(inverse).to(torch.float64)
    out = []
    for c in range(P.shape[0]):
        y = (torch.zeros_like(radii).index_add_(0, inverse, P[c].flatten()) / counts).log()

        def profile(log_c2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            X = -(log_c2.exp()[:, None] + radii[None, :]).log()   # y = a + m X
            Xm, ym = X.mean(1, keepdim=True), y.mean()
            m = ((X - Xm) * (y - ym)).sum(1) / (X - Xm).square().sum(1)
            a = ym - m * Xm[:, 0]
            sse = (y - a[:, None] - m[:, None] * X).square().sum(1)
            return sse, a, m

        grid = torch.linspace(-14, 6, 401, dtype=torch.float64)
        j = int(profile(grid)[0].argmin())
        lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, grid.numel() - 1)]
        g = (math.sqrt(5) - 1) / 2
        for _ in range(80):
            a1, a2 = hi - g * (hi - lo), lo + g * (hi - lo)
            if profile(a1[None])[0] < profile(a2[None])[0]:
                hi = a2
            else:
                lo = a1
        best = ((lo + hi) / 2)[None]
        _, a, m = profile(best)
        out.append(torch.stack([a[0].exp(), best[0].exp(), m[0]]))
    return torch.stack(out)


def data_hash(images: Tensor) -> str:
    """Content hash of the images as float32: the cache key of everything estimated from them."""
    return content_hash(_CACHE_VERSION, images.detach().to("cpu", torch.float32))


def estimate_spectrum(images: Tensor, source: str = "empirical", *, floor: float = 1e-6, cache: bool = True) -> Tensor:
    """The per-channel spectrum of ``images`` (N, C, H, W) in their own units, (C, H, W) float64.

    ``empirical``: the 2-D table; ``radial``: the fitted power law per channel. Values are floored at
    ``floor`` (a zero-variance frequency has ln S = -inf). Results are cached (``genflow.cache``, under
    ``$GENFLOW_CACHE``, default ``~/.cache/genflow``) keyed by the data hash, source and floor."""
    if source not in ("empirical", "radial"):
        raise config_error(f"source={source!r} cannot be estimated from data",
                           "the spectrum is the empirical 2-D table or a radial power-law fit",
                           "use source=empirical or source=radial (source=constants takes c1, c2, m)")
    if not floor > 0:
        raise config_error(f"floor={floor} is not positive", "ln S must be finite at every frequency",
                           "use floor=1e-6 (images in [-1, 1])")

    def compute() -> Tensor:
        P = empirical_spectrum(images)
        if source == "radial":
            consts = fit_power_law(P)
            k = radial_frequency(*P.shape[-2:])
            P = consts[:, 0, None, None] / (consts[:, 1, None, None] + k) ** consts[:, 2, None, None]
        return P.clamp_min(floor)

    if not cache:
        return compute()
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"spd_spectrum_{data_hash(images)}_{source}_{floor:g}.safetensors"
    return cached(path, compute, load=lambda f: load_file(str(f))["spectrum"],
                  save=lambda S, f: save_file({"spectrum": S.contiguous()}, str(f)))
