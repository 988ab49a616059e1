"""Monotone cubic Hermite interpolation (Fritsch-Butland slopes, as scipy's PchipInterpolator), shared
by the separation function lambda-hat (``kinetic``) and the kinetic-optimal path table (``paths``)."""
from __future__ import annotations

import torch
from torch import Tensor


def pchip_slopes(x: Tensor, y: Tensor) -> Tensor:
    """Knot slopes that keep the cubic Hermite interpolant monotone wherever the data are."""
    h = x[1:] - x[:-1]
    delta = (y[1:] - y[:-1]) / h
    m = torch.zeros_like(y)
    if x.numel() == 2:
        return m + delta
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same = (delta[:-1] * delta[1:]) > 0
    safe0 = torch.where(same, delta[:-1], torch.ones_like(delta[:-1]))
    safe1 = torch.where(same, delta[1:], torch.ones_like(delta[1:]))
    m[1:-1] = torch.where(same, (w1 + w2) / (w1 / safe0 + w2 / safe1), torch.zeros_like(w1))

    def end(h0, h1, d0, d1):
        e = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        e = torch.where(torch.sign(e) != torch.sign(d0), torch.zeros_like(e), e)
        return torch.where((torch.sign(d0) != torch.sign(d1)) & (e.abs() > 3 * d0.abs()), 3 * d0, e)

    m[0] = end(h[0], h[1], delta[0], delta[1])
    m[-1] = end(h[-1], h[-2], delta[-1], delta[-2])
    return m


def limit_slopes(x: Tensor, y: Tensor, m: Tensor) -> Tensor:
    """Fritsch-Carlson limiter: shrink given (e.g. exact) knot slopes of monotone data just enough that
    the cubic Hermite interpolant stays monotone (alpha^2 + beta^2 <= 9 on every interval)."""
    delta = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
    flat = delta == 0
    safe = torch.where(flat, torch.ones_like(delta), delta)
    a, b = m[:-1] / safe, m[1:] / safe
    norm = torch.sqrt(a * a + b * b)
    tau = torch.where(flat, torch.zeros_like(norm), torch.clamp(3 / norm.clamp_min(1e-300), max=1.0))
    scale = torch.ones_like(m)
    scale[:-1] = torch.minimum(scale[:-1], tau)
    scale[1:] = torch.minimum(scale[1:], tau)
    return m * scale


def hermite(x: Tensor, y: Tensor, m: Tensor, xq: Tensor) -> tuple[Tensor, Tensor]:
    """Value and derivative at ``xq`` of the cubic Hermite interpolant through (x, y) with slopes m.

    Outside [x0, xn] the end cubic is extended; callers clamp first.
    """
    i = (torch.searchsorted(x, xq.contiguous(), right=True) - 1).clamp(0, x.numel() - 2)
    x0, x1, y0, y1, m0, m1 = x[i], x[i + 1], y[i], y[i + 1], m[i], m[i + 1]
    h = x1 - x0
    tau = (xq - x0) / h
    t2, t3 = tau * tau, tau * tau * tau
    val = (2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + tau) * h * m0 + (3 * t2 - 2 * t3) * y1 + (t3 - t2) * h * m1
    der = (6 * t2 - 6 * tau) * (y0 - y1) / h + (3 * t2 - 4 * tau + 1) * m0 + (3 * t2 - 2 * tau) * m1
    return val, der
