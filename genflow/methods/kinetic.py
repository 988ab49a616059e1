"""Data separation function, kinetic-optimal (KO) path construction and kinetic energy.

Shaul et al., "On Kinetic Optimal Probability Paths for Generative Models" (ICML 2023). Paper -> code:

- Eq. 23 lambda(s) = (1/d) E ||E[x1 | x1 + eps/s]||^2, in MMSE form 1 - lambda(s) = (1/d) E ||x1 - E[x1|x]||^2,
  never below the linear-MMSE bound s^2/(1+s^2)                          -> ``estimate_separation``,
                                                                            ``admissible_floor``
- Eqs. 36/39 posterior over training points, a softmax with temperature s^2; the Gram matrix
  ||x_j - x_i||^2 and the projections <eps, x_j - x_i> are computed once and reused on the s-grid
  (logits = -s^2 G / 2 - s E)                                              -> ``estimate_separation``
- Eq. 27 gamma(theta) = 1 - (1 - lambda(tan theta)) / cos^2 theta          -> ``SeparationFunction.gamma``
- Thm 3.1 (Eqs. 28-29) solved in closed form: with Phi(theta) = int_0^theta sqrt(gamma) the energy is
  int r'^2 + r^2 Phi'^2 dt, the flat metric in polar coordinates, so the optimum is the straight segment
  from (1, 0) to (cos Phi_1, sin Phi_1); b = 2 (1 - cos Phi_1), KE_KO = 2 (1 - cos Phi_1)  -> ``ko_table``
  (the path itself is evaluated by ``genflow.methods.paths.KineticOptimal``)
- Eq. 21 / 27 kinetic energy of any affine path on data with separation lambda,
  KE = int_0^1 r'^2 + r^2 theta'^2 gamma(theta) dt                       -> ``kinetic_energy``

Eqs. 7-8 require normalised data (E x = 0, (1/d) E ||x||^2 = 1): lambda and the KO path change with the
data's scale, so the estimator refuses other data (``normalize`` gives the map).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from genflow.errors import config_error
from genflow.methods.splines import hermite, limit_slopes, pchip_slopes

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# normalisation (Eqs. 7-8)
# ---------------------------------------------------------------------------------------------
def normalize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, scale) with z = (x - mean) / scale centred per dimension and (1/d) E||z||^2 = 1."""
    x = x.to(torch.float32)
    mean = x.mean(0)
    scale = (x - mean).pow(2).mean().sqrt()
    return (x - mean) / scale, mean, scale


def check_normalized(x: Tensor, tol: float = 0.05) -> None:
    """Raise a ConfigError unless x (n, ...) is centred and has unit mean square per dimension."""
    if x.ndim < 2 or x.shape[0] < 2:
        raise config_error(f"lambda-hat got data of shape {tuple(x.shape)}", "it needs a set of samples (n, ...)",
                           "pass all training points as one tensor, first dimension = samples")
    flat = x.reshape(x.shape[0], -1).to(F64)
    mean_sq = flat.mean(0).pow(2).mean()
    power = flat.pow(2).mean()
    if mean_sq > tol ** 2 or abs(power - 1) > tol:
        raise config_error(
            f"data for lambda-hat is not normalised: (1/d)||mean||^2 = {float(mean_sq):.3g}, "
            f"(1/d)E||x||^2 = {float(power):.3g} (need 0 and 1)",
            "the separation function and the kinetic-optimal path assume centred data with unit mean square "
            "(Shaul et al. Eqs. 7-8); on other data they describe a different path",
            "normalise first: z, mean, scale = genflow.methods.kinetic.normalize(x) (model.normalize=true does "
            "this in training)")


# ---------------------------------------------------------------------------------------------
# separation functions
# ---------------------------------------------------------------------------------------------
class SeparationFunction:
    """lambda(s) tabulated on an s-grid, interpolated monotonically (PCHIP in theta = atan s).

    Below the first node lambda follows the small-SNR law lambda ~ s^2; beyond the last node the
    product (1 - lambda(s))(1 + s^2) is held, i.e. gamma stays constant up to theta = pi/2.
    """

    def __init__(self, s, lam):
        s = torch.as_tensor(s, dtype=F64).flatten().cpu()
        lam = torch.as_tensor(lam, dtype=F64).flatten().cpu()
        if s.numel() != lam.numel() or s.numel() < 2:
            raise config_error(f"separation table has {s.numel()} s values and {lam.numel()} lambda values",
                               "lambda must be tabulated on the s-grid, at least two points",
                               "pass s and lam of the same length")
        if (s < 0).any() or (s[1:] <= s[:-1]).any() or not torch.isfinite(s).all():
            raise config_error("separation s-grid is not finite, non-negative and strictly increasing",
                               "s is a signal-to-noise ratio alpha/sigma", "sort s and drop duplicates")
        # lambda is nondecreasing in s (MMSE falls as SNR rises); enforce it against Monte-Carlo noise
        lam = torch.cummax(lam.clamp(0, 1), 0).values
        self.s, self.lam = s, lam
        self._theta = torch.atan(s)
        self._slopes = pchip_slopes(self._theta, lam)
        self._g_last = (1 - lam[-1]) * (1 + s[-1] ** 2)

    def mmse(self, s: Tensor) -> Tensor:
        """1 - lambda(s)."""
        s = torch.as_tensor(s, dtype=F64)
        th = torch.atan(s).clamp(self._theta[0], self._theta[-1])
        inside, _ = hermite(self._theta.to(s.device), self.lam.to(s.device), self._slopes.to(s.device), th)
        out = 1 - inside.clamp(0, 1)
        s0, l0 = float(self.s[0]), float(self.lam[0])
        if s0 > 0:
            out = torch.where(s < s0, 1 - l0 * (s / s0) ** 2, out)
        return torch.where(s > self.s[-1].to(s.device), self._g_last / (1 + s * s), out)

    def __call__(self, s: Tensor) -> Tensor:
        return 1 - self.mmse(s)

    def gamma(self, theta: Tensor) -> Tensor:
        return _gamma(self, theta)

    def integral(self) -> Tensor:
        """int_0^inf (1 - lambda(s)) ds; Cond-OT's kinetic energy is 2 minus this (from Eq. 23)."""
        return _mmse_integral(self)

    def state(self) -> dict:
        return {"s": self.s, "lam": self.lam}


def as_separation(lam) -> "SeparationFunction | Callable":
    """Accept a SeparationFunction, an (s, lam) pair, or a callable lambda(s) (optionally with ``mmse``)."""
    if isinstance(lam, SeparationFunction):
        return lam
    if isinstance(lam, (tuple, list)) and len(lam) == 2:
        return SeparationFunction(*lam)
    if callable(lam):
        return lam
    raise config_error(f"cannot use {type(lam).__name__} as a separation function",
                       "lambda is a function of the SNR s", "pass a SeparationFunction, (s, lam) or a callable")


def _mmse_of(sep, s: Tensor) -> Tensor:
    # 1 - lambda computed directly where available: at large s the subtraction would lose all digits
    return sep.mmse(s) if hasattr(sep, "mmse") else 1 - sep(s)


def _gamma(sep, theta: Tensor) -> Tensor:
    theta = torch.as_tensor(theta, dtype=F64)
    s = torch.tan(theta)
    return (1 - _mmse_of(sep, s) * (1 + s * s)).clamp(0, 1)


def _mmse_integral(sep, n: int = 8192) -> Tensor:
    # substitute s = tan(theta): int (1 - lambda) ds = int_0^{pi/2} (1 - lambda(tan th)) / cos^2 th dth
    nodes, weights = _gauss_panels(0.0, 0.5 * math.pi)
    s = torch.tan(nodes)
    return (weights * _mmse_of(sep, s) * (1 + s * s)).sum()


# ---------------------------------------------------------------------------------------------
# lambda-hat estimator (Eqs. 36, 39 in MMSE form)
# ---------------------------------------------------------------------------------------------
def default_s_grid(points: int = 64) -> Tensor:
    """s = tan(theta) on a uniform theta-grid over [0, pi/2): dense where the KO construction needs it."""
    return torch.tan(torch.linspace(0, 0.5 * math.pi, points + 1, dtype=F64)[:-1])


ADMISSIBLE_MARGIN = 0.01


def admissible_floor(s: Tensor, margin: float = ADMISSIBLE_MARGIN) -> Tensor:
    """The least lambda-hat accepted at SNR s: s^2/(1+s^2) + margin s^2/(1+s^2)^2, i.e. gamma(theta) >=
    margin sin^2(theta).

    Every normalised data set has lambda(s) >= s^2/(1+s^2) (the linear-MMSE bound, equality only for an
    isotropic Gaussian), so gamma >= 0. Monte-Carlo noise can push lambda-hat below it at low SNR, where
    the exact lambda exceeds the bound by O(s^4) only; gamma is then 0 over a range of angles, Phi is
    flat there and the KO path jumps across it at t = 0 (free in kinetic energy, but the conditional
    target of training becomes unbounded). The margin keeps Phi strictly increasing, so the path crosses
    those angles over a finite time; it is 0 at s = 0 and at most margin / 4 (s = 1).
    """
    s2 = s * s
    return s2 / (1 + s2) + margin * s2 / (1 + s2) ** 2


@torch.no_grad()
def estimate_separation(x: Tensor, *, s: Tensor | None = None, queries: int = 1024,
                        generator: torch.Generator | None = None, device=None, max_block: int = 2 ** 22,
                        check: bool = True, margin: float = ADMISSIBLE_MARGIN) -> SeparationFunction:
    """lambda-hat of the empirical distribution of x (n, ...), normalised (see ``check_normalized``).

    ``queries`` noisy points x_j + eps/s: anchors x_j cycle through a random permutation of the data
    (stratified: every point is used equally often, up to one), noise comes in antithetic pairs
    (eps, -eps) sharing an anchor, and the same eps serve the whole s-grid (common random numbers keep
    the curve smooth). For each s the posterior over all n points is a log-sum-exp softmax and

        lambda-hat(s) = P - (1/(k d)) sum_q [ ||x_j(q) - E[x1|x_q]||^2 - c(s) (||x_j(q)||^2 - d P) ],

    the MMSE form (P = (1/d) E||x1||^2 over the data, 1 when normalised) with the anchors' mean square as
    a control variate, c(s) its regression coefficient over the queries: at low SNR the error is mostly
    the anchor itself (c -> 1), so the luck of which points were drawn cancels and lambda-hat(0) = 0
    exactly (the posterior is then the uniform prior over the centred data, whose mean is 0); at high SNR
    c -> 0 and the plain estimator remains. The antithetic pairs cancel the O(s) term of the posterior
    mean at low SNR. The curve is made nondecreasing and admissible
    (``admissible_floor``). Cost O(queries * n * (d + len(s))), in blocks of ``max_block`` entries.
    """
    if check:
        check_normalized(x)
    if queries < 1:
        raise config_error(f"lambda-hat queries={queries}", "it is the number of Monte-Carlo noise samples",
                           "use a positive number (2048 is plenty, the paper's Fig. 4 shows little change)")
    device = torch.device(device) if device is not None else x.device
    data64 = x.reshape(x.shape[0], -1).to(device=device, dtype=F64)
    data64 = data64 - data64.mean(0)            # exactly centred: the posterior mean at s = 0 is 0
    data = data64.to(torch.float32)
    n, d = data.shape
    s = default_s_grid() if s is None else torch.as_tensor(s, dtype=F64).flatten()
    gen_device = generator.device if generator is not None else device
    perm = torch.randperm(n, generator=generator, device=gen_device).to(device)
    pairs = (queries + 1) // 2
    anchors = perm[torch.arange(pairs, device=device) % n].repeat_interleave(2)[:queries]
    half = torch.randn(pairs, d, generator=generator, device=gen_device).to(device)
    eps = torch.stack([half, -half], 1).reshape(2 * pairs, d)[:queries]

    sq = data64.pow(2).sum(1)
    power = float(sq.mean()) / d                 # (1/d) E||x1||^2 over the whole data set (1 when normalised)
    s_dev = s.to(device=device, dtype=torch.float32)
    err2 = torch.zeros(queries, s.numel(), dtype=F64, device=device)   # ||x_q's anchor - E[x1|x_q]||^2
    block = max(1, min(queries, max_block // n))
    at_zero = (s == 0).tolist()                # where the posterior is the uniform prior
    for start in range(0, queries, block):
        idx = anchors[start:start + block]
        xa, ea = data64[idx], eps[start:start + block].to(F64)
        # Gram trick: -s^2 ||x_j + eps/s - x_i||^2 / 2 = -s^2 G_ji / 2 - s <eps, x_j - x_i> + const(i)
        gram = (sq[idx, None] + sq[None, :] - 2 * xa @ data64.T).clamp_min(0)
        gram[torch.arange(idx.numel(), device=device), idx] = 0.0
        proj = (ea * xa).sum(1, keepdim=True) - ea @ data64.T
        gram, proj, xa32 = gram.to(torch.float32), proj.to(torch.float32), xa.to(torch.float32)
        for k in range(s.numel()):
            if at_zero[k]:
                err2[start:start + idx.numel(), k] = sq[idx]   # uniform posterior: E[x1|x] = the mean, 0
                continue
            sk = s_dev[k]
            w = torch.softmax(-0.5 * sk * sk * gram - sk * proj, dim=1)
            err2[start:start + idx.numel(), k] = (xa32 - w @ data).to(F64).pow(2).sum(1)
    # control variate: the anchors' mean square, whose population value is known; its regression
    # coefficient on the error is 1 at s = 0 (the error is the anchor itself) and falls to 0 at high SNR
    own = sq[anchors]
    own_c = own - own.mean()
    var = own_c.pow(2).sum()
    coef = (own_c @ (err2 - err2.mean(0))) / var if var > 0 else torch.zeros(s.numel(), dtype=F64, device=device)
    mmse = (err2.mean(0) - coef * (own.mean() - power * d)) / d
    lam = (power - mmse).cpu()
    lam[s == 0] = 0.0                # exactly: the error is the anchor itself and the control variate cancels it
    # lambda is nondecreasing in s (MMSE falls as SNR rises): a running maximum removes Monte-Carlo
    # wiggles; then the admissibility floor (itself increasing, 0 at s = 0)
    lam = torch.maximum(torch.cummax(lam.clamp(0, 1), 0).values, admissible_floor(s, margin).clamp(0, 1))
    return SeparationFunction(s, lam)


# ---------------------------------------------------------------------------------------------
# KO construction (Thm 3.1 through Phi)
# ---------------------------------------------------------------------------------------------
def ko_table(sep, size: int = 4097) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Phi_1, u-knots, theta-knots, slopes): theta as a function of u = sqrt(Phi / Phi_1).

    Knot slopes are exact, d theta / du = 2 u Phi_1 / sqrt(gamma) (PCHIP's end formula at u = 0, where
    it is 0/0), then limited so the cubic Hermite table stays monotone.

    Phi(theta) = int_0^theta sqrt(gamma) by the trapezoid rule on a uniform theta-grid; gamma is
    floored at 1e-14 so Phi is strictly increasing even for a lambda given by hand (an estimated
    lambda-hat is admissible, ``admissible_floor``, so the floor does not act there).
    """
    if size < 16:
        raise config_error(f"KO table_size={size}", "the table must resolve theta in [0, pi/2]",
                           "use at least a few hundred knots (default 4097)")
    sep = as_separation(sep)
    theta = torch.linspace(0, 0.5 * math.pi, size, dtype=F64)
    root = _gamma(sep, theta).clamp_min(1e-14).sqrt()
    phi = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(0.5 * (root[1:] + root[:-1]) * (theta[1:] - theta[:-1]), 0)])
    phi1 = phi[-1]
    if phi1 < 1e-6:
        raise config_error(f"the data's kinetic-optimal path is degenerate (Phi_1 = {float(phi1):.2e})",
                           "gamma ~ 0 everywhere: the data behaves like an isotropic Gaussian, for which every "
                           "path with r = 1 (e.g. cosine) is optimal and KO is not unique",
                           "use path=cosine (or condot) for this data")
    u = torch.sqrt(phi / phi1)
    slopes = 2 * u * phi1 / root
    slopes[0] = pchip_slopes(u[:3], theta[:3])[0]
    return phi1, u, theta, limit_slopes(u, theta, slopes)


def ko_energy(phi1: Tensor | float) -> Tensor:
    """Kinetic energy of the KO path: 2 (1 - cos Phi_1) (the squared length of the straight segment)."""
    return 2 * (1 - torch.cos(torch.as_tensor(phi1, dtype=F64)))


# ---------------------------------------------------------------------------------------------
# kinetic energy
# ---------------------------------------------------------------------------------------------
def _gauss_legendre(order: int) -> tuple[Tensor, Tensor]:
    # Golub-Welsch: nodes are the eigenvalues of the Jacobi matrix of the Legendre recurrence
    k = torch.arange(1, order, dtype=F64)
    beta = k / torch.sqrt(4 * k * k - 1)
    jac = torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vecs = torch.linalg.eigh(jac)
    return nodes, 2 * vecs[0] ** 2


def _gauss_panels(a: float, b: float, panels: int = 96, order: int = 10, smallest: float = 1e-13) -> tuple[Tensor, Tensor]:
    """Composite Gauss-Legendre on [a, b] with panels graded geometrically towards both ends, where
    path integrands have sqrt and log behaviour."""
    half = 0.5 * (b - a)
    rel = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(math.log10(smallest), 0, panels, dtype=F64)])
    edges = torch.cat([a + half * rel, (b - half * rel).flip(0)[1:]])
    x, w = _gauss_legendre(order)
    lo, hi = edges[:-1, None], edges[1:, None]
    nodes = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
    weights = 0.5 * (hi - lo) * w
    return nodes.flatten(), weights.flatten()


def kinetic_energy(scheduler, lam, *, t_min: float | None = None, t_max: float | None = None) -> Tensor:
    """Kinetic energy (Eq. 18, per dimension) of ``scheduler``'s path on normalised data with separation
    ``lam``, via the polar form int r'^2 + r^2 theta'^2 gamma(theta) dt (equivalent to Eq. 21 but free of
    the cancelling 1/t terms of KO starts). Integrated over [scheduler.t_min, scheduler.t_max] unless given.
    """
    sep = as_separation(lam)
    a = scheduler.t_min if t_min is None else t_min
    b = scheduler.t_max if t_max is None else t_max
    t, w = _gauss_panels(a, b)
    dev = next(iter(scheduler.buffers()), torch.empty(0)).device
    out = scheduler(t.to(dev))
    al, si, da, ds = (v.to(F64).cpu() for v in (out.alpha_t, out.sigma_t, out.d_alpha_t, out.d_sigma_t))
    r2 = al * al + si * si
    d_r2 = (al * da + si * ds) ** 2 / r2           # r'^2
    rt2 = (da * si - al * ds) ** 2 / r2             # r^2 theta'^2
    gamma = _gamma(sep, torch.atan2(al, si))
    return (w * (d_r2 + rt2 * gamma)).sum()
