"""A circle with a non-uniform angle, embedded isometrically in R^D: the singular toy data of the
noise-perturbed likelihood experiment (Chae et al. 2023).

theta = 2 pi U, U ~ Beta(a, b) (non-uniform, so learning the circle is not learning the distribution
on it); x = E (cos theta, sin theta) + noise eps, with E a fixed random D x 2 matrix with orthonormal
columns (seeded), so distances and densities of the 2-D picture carry over exactly.

Reference densities of the perturbed law q_sigma = P * N(0, sigma^2 I_D), for evaluating models:
- ``circle_log_density``: quadrature over the angle (any a, b);
- ``uniform_circle_log_density``: the closed form for a = b = 1 in the plane,
  log q_sigma(y) = -log(2 pi sigma^2) - (r^2 + 1)/(2 sigma^2) + log I0(r/sigma^2), r = |y|,
  times N(0, sigma^2) for the D - 2 normal coordinates.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from genflow.data.base import GenerativeDataModule
from genflow.errors import config_error


def _check(D: int, a: float, b: float, noise: float) -> None:
    if isinstance(D, bool) or int(D) != D or D < 2:
        raise config_error(f"circle D={D!r}", "the circle lives in a plane of the ambient space R^D",
                           "use an integer D >= 2 (e.g. 2, 8, 32)")
    if not (a > 0 and b > 0):
        raise config_error(f"circle angle law Beta(a={a}, b={b})", "Beta parameters must be positive",
                           "use e.g. a=2, b=5 (a=b=1 is the uniform circle)")
    if not noise >= 0:
        raise config_error(f"circle noise={noise}", "it is a standard deviation", "use 0 or a positive value")


def circle_frame(D: int, seed: int = 0) -> Tensor:
    """(D, 2) float64 with orthonormal columns: a fixed, seeded isometric embedding of the plane."""
    _check(D, 1.0, 1.0, 0.0)
    g = torch.randn(int(D), 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))  # fixes QR's sign ambiguity so the frame is reproducible


def sample_circle(n: int, *, D: int = 2, a: float = 2.0, b: float = 5.0, noise: float = 0.0, seed: int = 0,
                  frame_seed: int = 0) -> Tensor:
    """(n, D) float32 points x = E (cos 2 pi U, sin 2 pi U) + noise eps, U ~ Beta(a, b); reproducible by ``seed``."""
    _check(D, a, b, noise)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # torch's Beta sampler takes no generator; a forked global RNG keeps it seeded and side-effect free
        u = torch.distributions.Beta(torch.tensor(float(a), dtype=torch.float64),
                                     torch.tensor(float(b), dtype=torch.float64)).sample((int(n),))
        eps = torch.randn(int(n), int(D), dtype=torch.float64)
    theta = 2 * math.pi * u
    x = torch.stack([theta.cos(), theta.sin()], 1) @ circle_frame(D, frame_seed).T
    return (x + noise * eps).float()


def _split(y: Tensor, frame: Tensor) -> tuple[Tensor, Tensor]:
    """In-plane coordinates (n, 2) and squared distance to the plane (n,), float64."""
    y = y.to(torch.float64)
    frame = frame.to(y)
    p = y @ frame
    perp2 = ((y - p @ frame.T) ** 2).sum(1)
    return p, perp2


def circle_log_density(y: Tensor, sigma: float, *, a: float = 2.0, b: float = 5.0, frame_seed: int = 0,
                       nodes: int = 4096, chunk: int = 1024) -> Tensor:
    """log q_sigma(y), (n,) float64, by midpoint quadrature over U in (0, 1) with the Beta(a, b) weights."""
    D = y.shape[1]
    _check(D, a, b, 0.0)
    frame = circle_frame(D, frame_seed)
    p, perp2 = _split(y, frame)
    u = (torch.arange(nodes, dtype=torch.float64, device=p.device) + 0.5) / nodes
    log_beta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log_w = log_beta + (a - 1) * u.log() + (b - 1) * torch.log1p(-u) - math.log(nodes)
    pts = torch.stack([torch.cos(2 * math.pi * u), torch.sin(2 * math.pi * u)], 1)
    const = -0.5 * D * math.log(2 * math.pi * sigma ** 2)
    out = []
    for i in range(0, p.shape[0], chunk):
        d2 = ((p[i:i + chunk, None, :] - pts[None]) ** 2).sum(-1) + perp2[i:i + chunk, None]
        out.append(torch.logsumexp(log_w - 0.5 * d2 / sigma ** 2, 1))
    return torch.cat(out) + const


def uniform_circle_log_density(y: Tensor, sigma: float, *, frame_seed: int = 0) -> Tensor:
    """Closed form (Bessel I0) of log q_sigma for the uniform unit circle embedded in R^D, (n,) float64."""
    D = y.shape[1]
    p, perp2 = _split(y, circle_frame(D, frame_seed))
    r = p.norm(dim=1)
    k = r / sigma ** 2
    # log I0(k) = log i0e(k) + k keeps large k finite
    plane = -math.log(2 * math.pi * sigma ** 2) - (r ** 2 + 1) / (2 * sigma ** 2) + torch.special.i0e(k).log() + k
    normal = -0.5 * (D - 2) * math.log(2 * math.pi * sigma ** 2) - 0.5 * perp2 / sigma ** 2
    return plane + normal


def uniform_circle_score(y: Tensor, sigma: Tensor | float, *, frame_seed: int = 0) -> Tensor:
    """grad_y log q_sigma(y) of the uniform circle (closed form via I1/I0), shaped like y, float64.

    In the plane: -p/sigma^2 + (I1/I0)(r/sigma^2) p/(r sigma^2); normal coordinates: -y_perp/sigma^2.
    ``sigma`` may be a scalar or per-sample (n,).
    """
    D = y.shape[1]
    frame = circle_frame(D, frame_seed).to(y.device)
    y64 = y.to(torch.float64)
    s2 = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).reshape(-1, 1) ** 2
    p = y64 @ frame
    r = p.norm(dim=1, keepdim=True).clamp_min(1e-300)
    k = r / s2
    ratio = torch.special.i1e(k) / torch.special.i0e(k)
    toward = (ratio / (r * s2)) * p  # pull towards the circle
    return -y64 / s2 + toward @ frame.T


class Circle(GenerativeDataModule):
    """``data=circle``: n points on the Beta-angle unit circle embedded in R^D (see module docstring)."""

    feature_extractor = "none"
    name = "circle"

    def __init__(self, n: int = 1000, D: int = 2, a: float = 2.0, b: float = 5.0, noise: float = 0.0,
                 frame_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        _check(D, a, b, noise)
        if isinstance(n, bool) or int(n) != n or n < 2:
            raise config_error(f"data.n={n!r}", "the circle dataset needs at least two points",
                               "use e.g. data.n=1000")
        self.n, self.D, self.a, self.b, self.noise, self.frame_seed = int(n), int(D), float(a), float(b), float(noise), frame_seed

    def examples(self) -> int:
        return self.n

    def _load(self):
        return sample_circle(self.n, D=self.D, a=self.a, b=self.b, noise=self.noise, seed=self.seed,
                             frame_seed=self.frame_seed), None


__all__ = ["Circle", "sample_circle", "circle_frame", "circle_log_density", "uniform_circle_log_density",
           "uniform_circle_score"]
