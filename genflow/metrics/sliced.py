"""Sliced Wasserstein distance between two sample sets (Rabin et al. 2011; Bonneel et al. 2015).

SW_p(x, y)^p = E_w W_p^p(<w, x>, <w, y>) over directions w uniform on the unit sphere, estimated with
``projections`` random directions. Each 1-D distance is exact: the quantile functions of the two
empirical measures are step functions, so W_p^p = sum over the merged breakpoints of
(interval length) * |F^-1(u) - G^-1(u)|^p, which also handles sets of different sizes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from genflow.errors import config_error


def wasserstein_1d(x: Tensor, y: Tensor, p: float = 2.0) -> Tensor:
    """W_p^p between the empirical measures of the rows' entries: x (k, n), y (k, m) -> (k,)."""
    xs, _ = torch.sort(x, dim=1)
    ys, _ = torch.sort(y, dim=1)
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return (xs - ys).abs().pow(p).mean(1)
    dt = torch.float64
    levels = torch.cat([torch.arange(1, n, device=x.device, dtype=dt) / n,
                        torch.arange(1, m, device=x.device, dtype=dt) / m,
                        torch.ones(1, device=x.device, dtype=dt)])
    levels, _ = torch.sort(levels)
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - 0.5 * widths
    ix = (mid * n).long().clamp(max=n - 1)
    iy = (mid * m).long().clamp(max=m - 1)
    return ((xs[:, ix] - ys[:, iy]).abs().to(dt).pow(p) * widths).sum(1).to(x.dtype)


def sliced_wasserstein(x: Tensor, y: Tensor, *, projections: int = 256, p: float = 2.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """SW_p between samples x (n, ...) and y (m, ...) (flattened to vectors), a 0-dim tensor.

    Directions are drawn on x's device from ``generator`` (fix it to compare models on the same slices).
    """
    if x.ndim < 2 or y.ndim < 2 or x[0].numel() != y[0].numel():
        raise config_error(f"sliced_wasserstein got shapes {tuple(x.shape)} and {tuple(y.shape)}",
                           "both sets must hold samples of the same dimension, first axis = samples",
                           "pass x (n, d) and y (m, d)")
    if projections < 1 or p < 1:
        raise config_error(f"projections={projections}, p={p}", "SW_p needs directions and p >= 1",
                           "use projections >= 1 and p >= 1")
    xf = x.reshape(x.shape[0], -1).to(torch.float32)
    yf = y.reshape(y.shape[0], -1).to(device=xf.device, dtype=torch.float32)
    w = torch.randn(projections, xf.shape[1], generator=generator, device=xf.device)
    w = w / w.norm(dim=1, keepdim=True)
    return wasserstein_1d(w @ xf.T, w @ yf.T, p).mean().pow(1.0 / p)
