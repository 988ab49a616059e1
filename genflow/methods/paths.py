"""Affine Gaussian probability paths x_t = alpha_t x_data + sigma_t x_noise (t = 0 noise, t = 1 data).

Conventions follow Meta's flow_matching: a scheduler is called as ``scheduler(t)`` and returns
``SchedulerOutput(alpha_t, sigma_t, d_alpha_t, d_sigma_t)``; ``snr_inverse(alpha/sigma)`` gives t back.

Paper map (Shaul et al., "On Kinetic Optimal Probability Paths for Generative Models", ICML 2023,
written (a_t, m_t) there, (alpha_t, sigma_t) here):

- Eq. 14 Cond-OT a = t, m = 1 - t                                   -> ``CondOT``
- Eq. 13 SI / cosine a = sin(pi t / 2), m = cos(pi t / 2)            -> ``Cosine``
- Eq. 12 DDPM / VP (flow_matching's VPScheduler parametrisation)     -> ``VP``
- Thm 3.1, Eqs. 28-29 kinetic-optimal path, tabulated               -> ``KineticOptimal``
  (r_t = sqrt(1 - b t + b t^2) and the angle theta_t; built in ``genflow.methods.kinetic.ko_table``
  through Phi(theta) = int sqrt(gamma), which turns the problem into a straight segment.)

``KineticOptimal`` stores theta as a monotone (PCHIP) function of u = sqrt(Phi / Phi_1): near the
noise end Phi ~ theta^2 for centred data, so theta(Phi) has a square-root singularity while
theta(u) is smooth. Monotone interpolation keeps alpha/sigma = tan(theta) strictly increasing (so
``snr_inverse`` is well defined) and the returned derivatives are those of the interpolant. The
exact path has alpha_t ~ sqrt(t) at t -> 0 (theta_t ~ sqrt(t) where gamma ~ theta^2), whose
conditional target is not square-integrable; on [0, t_eps] we keep the segment's radius r_t exact and
let theta grow linearly to theta(t_eps). The boundary values stay exact, and the kinetic energy changes
by at most (4/3 - 1) sin^2(Phi_1) t_eps where gamma ~ theta^2 near 0 (the energy over [0, t_eps] is
int r'^2 + r^2 theta'^2 gamma). A chord in (alpha, sigma) instead would leave the circle and add a radial
cost ~ theta(t_eps)^4 / t_eps, which is large wherever gamma is nearly flat and theta(t_eps) is not small;
``genflow.methods.kinetic.admissible_floor`` keeps Phi strictly increasing so theta(t_eps) stays small.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genflow.errors import config_error
from genflow.methods.kinetic import SeparationFunction, estimate_separation, ko_table
from genflow.methods.splines import hermite


@dataclass
class SchedulerOutput:
    """alpha_t, sigma_t and their time derivatives, each shaped like t."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


# ---------------------------------------------------------------------------------------------
# schedulers
# ---------------------------------------------------------------------------------------------
class Scheduler(nn.Module, ABC):
    """alpha_t, sigma_t of an affine Gaussian path. Subclasses implement ``forward(t)``.

    ``t_min``/``t_max`` bound the interval on which the schedule is regular (VP is truncated at
    t = 1 - 1e-5 as in Lipman et al.); kinetic energies and likelihood checks integrate over it.
    """

    name: str = "scheduler"
    t_min: float = 0.0
    t_max: float = 1.0
    # the flow-matching loss weight this path trains with by default (``FlowMatching(loss_weight="path")``):
    # none (Eq. 41 as printed) unless the path's target scale makes the uniform-t loss ill-posed
    loss_weight: str = "none"

    @abstractmethod
    def forward(self, t: Tensor) -> SchedulerOutput:
        """Schedule at times t (any shape), returned in t's dtype."""

    def theta_inverse(self, theta: Tensor, iters: int = 64) -> Tensor:
        """t with atan2(alpha_t, sigma_t) = theta, by vectorised bisection (the angle is monotone).

        Working with the angle instead of the SNR keeps t = 1 (SNR = inf) finite.
        """
        th = theta.to(torch.float64)
        lo = torch.full_like(th, self.t_min)
        hi = torch.full_like(th, self.t_max)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            out = self(mid)
            below = torch.atan2(out.alpha_t, out.sigma_t) < th
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(theta.dtype)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        """t with alpha_t / sigma_t = snr (snr >= 0, inf allowed)."""
        return self.theta_inverse(torch.atan(snr.to(torch.float64))).to(snr.dtype)

    def extra_repr(self) -> str:
        return self.name


def _as_float(t: Tensor) -> Tensor:
    return t if torch.is_floating_point(t) else t.to(torch.get_default_dtype())


class CondOT(Scheduler):
    """Conditional optimal transport: alpha = t, sigma = 1 - t (Eq. 14)."""

    name = "condot"

    def forward(self, t: Tensor) -> SchedulerOutput:
        t = _as_float(t)
        one = torch.ones_like(t)
        return SchedulerOutput(t, 1 - t, one, -one)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return torch.where(torch.isinf(snr), torch.ones_like(snr), snr / (1 + snr))


class Cosine(Scheduler):
    """Trigonometric (SI) path: alpha = sin(pi t/2), sigma = cos(pi t/2) (Eq. 13)."""

    name = "cosine"

    def forward(self, t: Tensor) -> SchedulerOutput:
        t = _as_float(t)
        h = 0.5 * math.pi
        return SchedulerOutput(torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t))

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return torch.atan(snr) * (2 / math.pi)


class VP(Scheduler):
    """Variance preserving (DDPM) path in flow_matching's parametrisation.

    alpha = exp(-T/2), sigma = sqrt(1 - exp(-T)), T(t) = (1-t)^2 (beta_max - beta_min)/2 + (1-t) beta_min.
    sigma' diverges at t = 1, so t is clamped to ``t_max`` (Lipman et al. evaluate VP on [0, 1 - 1e-5]);
    alpha(0) = exp(-T(0)/2) ~ 0.0064, not 0.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_max: float = 1 - 1e-5):
        super().__init__()
        if not 0 < beta_min < beta_max:
            raise config_error(f"VP got beta_min={beta_min}, beta_max={beta_max}",
                               "the noise rate must be positive and increase", "use 0 < beta_min < beta_max")
        self.beta_min, self.beta_max, self.t_max = float(beta_min), float(beta_max), float(t_max)

    def forward(self, t: Tensor) -> SchedulerOutput:
        t = _as_float(t)
        u = 1 - t.clamp(max=self.t_max)
        db = self.beta_max - self.beta_min
        big_t = 0.5 * u * u * db + u * self.beta_min
        d_big_t = -(u * db + self.beta_min)
        alpha = torch.exp(-0.5 * big_t)
        sigma = torch.sqrt(-torch.expm1(-big_t))
        return SchedulerOutput(alpha, sigma, -0.5 * d_big_t * alpha, 0.5 * d_big_t * torch.exp(-big_t) / sigma)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        # alpha^2 / sigma^2 = snr^2  <=>  T = log(1 + snr^-2), a quadratic in u = 1 - t
        big_t = torch.log1p(snr.pow(-2))
        db = self.beta_max - self.beta_min
        u = (torch.sqrt(self.beta_min ** 2 + 2 * db * big_t) - self.beta_min) / db
        return (1 - u).clamp(0.0, self.t_max)


class _ResizingBuffers:
    """Buffers whose shape is only known after fitting (KO table, data statistics) take the shape
    stored in a checkpoint, so a model restores without seeing data."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device, dtype=buf.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class KineticOptimal(_ResizingBuffers, Scheduler):
    """Tabulated kinetic-optimal path (Thm 3.1) for data with separation function lambda(s).

    Build with ``KineticOptimal.from_separation(s, lam)`` or ``KineticOptimal.from_data(x)``; an
    empty instance (``KineticOptimal()``) is filled by ``fit(s, lam)`` or by loading a state_dict.
    Buffers: ``phi1`` = Phi_1 (b = 2 (1 - cos Phi_1)), ``knots_u`` / ``knots_theta`` / ``slopes`` the
    monotone table theta(u), ``t_eps`` the end of the start arc, ``ready`` whether it was fitted.
    """

    name = "ko"
    # alpha_t ~ sqrt(t) at the start: the conditional target's mean square ~ 1/t rules the unweighted loss
    loss_weight = "target_scale"

    def __init__(self, t_eps: float = 1e-4):
        super().__init__()
        if not 0 <= t_eps < 0.5:
            raise config_error(f"KineticOptimal t_eps={t_eps}", "it is the length of the smoothed start of the path",
                               "use a small value such as 1e-4 (0 keeps the exact sqrt(t) start)")
        f64 = torch.float64
        self.register_buffer("phi1", torch.tensor(0.5 * math.pi, dtype=f64))
        self.register_buffer("knots_u", torch.linspace(0, 1, 2, dtype=f64))
        self.register_buffer("knots_theta", torch.tensor([0.0, 0.5 * math.pi], dtype=f64))
        self.register_buffer("slopes", torch.zeros(2, dtype=f64))
        self.register_buffer("t_eps", torch.tensor(float(t_eps), dtype=f64))
        self.register_buffer("ready", torch.tensor(False))
        self._fitted = False  # host-side copy of ``ready``: no device sync per call

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_separation(cls, s, lam, *, t_eps: float = 1e-4, table_size: int = 4097) -> "KineticOptimal":
        """KO path for lambda tabulated on an s-grid (s >= 0 increasing) or given as a callable."""
        ko = cls(t_eps=t_eps)
        ko.fit(s, lam, table_size=table_size)
        return ko

    @classmethod
    def from_data(cls, x: Tensor, *, t_eps: float = 1e-4, table_size: int = 4097, **estimator) -> "KineticOptimal":
        """Estimate lambda-hat on normalised data x (n, ...) and build its KO path."""

        sep = estimate_separation(x, **estimator)
        return cls.from_separation(sep.s, sep.lam, t_eps=t_eps, table_size=table_size)

    @torch.no_grad()
    def fit(self, s, lam, *, table_size: int = 4097) -> "KineticOptimal":

        sep = lam if callable(lam) and not isinstance(lam, Tensor) else SeparationFunction(s, lam)
        phi1, u, theta, slopes = ko_table(sep, size=table_size)
        dev = self.phi1.device
        self.phi1 = phi1.to(dev)
        self.knots_u, self.knots_theta, self.slopes = u.to(dev), theta.to(dev), slopes.to(dev)
        self.ready = torch.tensor(True, device=dev)
        self._fitted = True
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "ready" in state_dict:
            self._fitted = bool(state_dict[prefix + "ready"])

    @property
    def b(self) -> Tensor:
        """The Theorem 3.1 constant: r_t^2 = 1 - b t + b t^2."""
        return 2 * (1 - torch.cos(self.phi1))

    def _check_ready(self) -> None:
        if not self._fitted:
            raise config_error("the kinetic-optimal path has no table yet",
                               "the KO path is computed from the training data's separation function",
                               "build it with KineticOptimal.from_data(x) / from_separation(s, lam), call "
                               "FlowMatching.prepare(datamodule), or load a checkpoint")

    # -- evaluation -----------------------------------------------------------------------------
    def _radius(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Point (px, py) of the straight segment in the (r, Phi) plane at t, its r and dr/dt."""
        c, s1 = torch.cos(self.phi1), torch.sin(self.phi1)
        b = 2 * (1 - c)
        px, py = 1 - t + t * c, t * s1
        r2 = px * px + py * py
        r = torch.sqrt(r2)
        return px, py, r2, r, b * (2 * t - 1) / (2 * r)

    def _exact(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The straight segment in (r, Phi) polar coordinates mapped back through theta(Phi)."""
        px, py, r2, r, d_r = self._radius(t)
        phi = torch.atan2(py, px)
        d_phi = torch.sin(self.phi1) / r2
        u = torch.sqrt((phi / self.phi1).clamp(0, 1))
        theta, d_theta_du = hermite(self.knots_u, self.knots_theta, self.slopes, u)
        d_theta = d_theta_du * d_phi / (2 * self.phi1 * u.clamp_min(1e-300))
        st, ct = torch.sin(theta), torch.cos(theta)
        return r * st, r * ct, d_r * st + r * ct * d_theta, d_r * ct - r * st * d_theta

    def forward(self, t: Tensor) -> SchedulerOutput:
        self._check_ready()
        t = _as_float(t)
        tt = t.to(torch.float64).clamp(0, 1)
        eps = self.t_eps
        a, m, da, dm = self._exact(torch.maximum(tt, eps))
        # start arc (module docstring): r exact, theta linear in t up to theta(t_eps); with t_eps = 0 the
        # mask is empty and the arc unused
        ae, me, _, _ = self._exact(eps.reshape(1))
        rate = torch.atan2(ae, me) / eps.clamp_min(1e-300)          # d theta / dt on the arc
        _, _, _, r, d_r = self._radius(tt)
        st, ct = torch.sin(rate * tt), torch.cos(rate * tt)
        arc = tt < eps
        a = torch.where(arc, r * st, a)
        m = torch.where(arc, r * ct, m)
        da = torch.where(arc, d_r * st + r * ct * rate, da)
        dm = torch.where(arc, d_r * ct - r * st * rate, dm)
        return SchedulerOutput(*(v.to(t.dtype) for v in (a, m, da, dm)))

    def extra_repr(self) -> str:
        return f"ko, Phi_1={float(self.phi1):.4f}, table={self.knots_u.numel()}, t_eps={float(self.t_eps):g}"


PATHS = {"condot": CondOT, "cosine": Cosine, "vp": VP, "ko": KineticOptimal}


def make_scheduler(path) -> Scheduler:
    """A scheduler from an instance or a name (condot | cosine | vp | ko; ko starts empty)."""
    if isinstance(path, Scheduler):
        return path
    if isinstance(path, str) and path.lower() in PATHS:
        return PATHS[path.lower()]()
    raise config_error(f"unknown flow-matching path {path!r}", "flow matching needs an affine Gaussian path",
                       f"use path=one of {', '.join(PATHS)} or pass a Scheduler instance")
