"""Closed-form solver cases shared by the exponential-integrator tests (DPM-Solver++(2M), UniPC): data whose
denoiser, velocity or PF-ODE map is known exactly on every method's Gaussian path, nets that return it, and
the measured order of a sequence of errors as the steps double."""
import math

import torch

from genflow import solvers
from genflow.methods import EDM, FlowMatching
from genflow.methods.paths import KineticOptimal
from gauss_lambda import GaussLambda

F64 = torch.float64
MU = torch.tensor([0.4, -0.1, 0.0, 0.2], dtype=F64)
VAR = torch.tensor([0.2, 0.05, 0.4, 0.01], dtype=F64)


def orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def assert_order(errors, order):
    measured = orders(errors)
    assert all(abs(p - order) <= 0.3 for p in measured), f"errors {errors}: measured orders {measured}"


def solve_errors(solver, m, net, x0, grids, exact, **options):
    """The largest error of ``solver`` on each of ``grids`` against ``exact(grid)``; N steps must be N calls."""
    errors = []
    for grid in grids:
        n = grid.numel() - 1
        out = m.solve(net, x0, steps=n, solver=solver, grid=grid, **options)
        assert out.nfe == n
        errors.append(float((out.x - exact(grid)).abs().max()))
    return errors


def gens(n):
    return [torch.Generator().manual_seed(i) for i in range(n)]


class EDMNet:
    """The raw net whose EDM-preconditioned output is a given denoiser f(x, sigma) (float64)."""

    def __init__(self, method, denoiser):
        self.m, self.f = method, denoiser

    def __call__(self, x_in, c_noise, cond=None):
        sigma = (4 * c_noise.to(F64)).exp()[:, None]
        c_skip, c_out, c_in, _ = self.m.preconditioning(sigma)
        x = x_in.to(F64) / c_in
        return ((self.f(x, sigma) - c_skip * x) / c_out).to(x_in.dtype)


def gaussian_denoiser(x, sigma):
    """E[y | y + sigma n = x] for y ~ N(MU, diag VAR), n ~ N(0, I)."""
    return MU + VAR / (VAR + sigma ** 2) * (x - MU)


def lambda_uniform(m, t_a, t_b, n):
    """n + 1 times from t_a to t_b uniform in lambda = ln(alpha/sigma) (finite at both), by bisection on the
    method's alpha_sigma: the order of a multistep method is a statement about h = max step in lambda."""
    lam = lambda t: solvers.mean_log_snr(m, t)
    ends = lam(torch.tensor([t_a, t_b], dtype=F64))
    target = ends[0] + torch.linspace(0, 1, n + 1, dtype=F64) * (ends[1] - ends[0])
    lo, hi = torch.full((n + 1,), float(t_a), dtype=F64), torch.full((n + 1,), float(t_b), dtype=F64)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = lam(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    out = 0.5 * (lo + hi)
    out[0], out[-1] = t_a, t_b
    return out


def gaussian_flow(m, x0, grid):
    """The exact PF-ODE map of N(MU, diag VAR) data on the path x_t = alpha x + sigma eps:
    x_t - alpha_t mu = (x_s - alpha_s mu) sqrt((alpha_t^2 v + sigma_t^2) / (alpha_s^2 v + sigma_s^2))."""
    (a0, s0), (a1, s1) = m.alpha_sigma(grid[0]), m.alpha_sigma(grid[-1])
    return a1 * MU + (x0 - a0 * MU) * ((a1 ** 2 * VAR + s1 ** 2) / (a0 ** 2 * VAR + s0 ** 2)).sqrt()

POINTS = torch.tensor([[0.5, -0.5, 0.2, 0.0], [-0.4, 0.3, 0.0, 0.6], [0.1, 0.1, -0.7, -0.2]], dtype=F64)


def pfgmpp_denoiser(D):
    """E[y | x] for y uniform on POINTS under PFGM++'s kernel (||x - y||^2 + sigma^2 D)^(-(N+D)/2) (Gaussian
    at D = inf): a softmax of the log-kernels, exact at any D."""
    n = POINTS.shape[1]

    def f(x, sigma):
        d2 = (x[:, None, :] - POINTS[None]).square().sum(-1)
        s2 = sigma.reshape(-1, 1) ** 2
        logk = -0.5 * d2 / s2 if math.isinf(D) else -0.5 * (n + D) * torch.log1p(d2 / (D * s2))
        return logk.softmax(1) @ POINTS

    return f


class FlowNet:
    """Exact marginal velocity of an affine path for N(MU, diag VAR) data (x_t = alpha x1 + sigma x0)."""

    def __init__(self, method):
        self.m = method

    def __call__(self, x, t, cond=None):
        o = self.m.schedule(t.to(F64)[:, None])
        a, s, da, ds = o.alpha_t, o.sigma_t, o.d_alpha_t, o.d_sigma_t
        r = (x.to(F64) - a * MU) / (a ** 2 * VAR + s ** 2)
        return (da * (MU + a * VAR * r) + ds * s * r).to(x.dtype)

PATHS = {"condot": "condot", "cosine": "cosine", "vp": "vp",
         "ko": lambda: KineticOptimal.from_separation(None, GaussLambda([0.5, 1.5]))}


class DDPMNet:
    """E[eps | x_s] for N(MU, diag VAR) data."""

    def __init__(self, method):
        self.m = method

    def __call__(self, x, label, cond=None):
        s = label.to(F64)[:, None] / self.m.label_scale
        ab, omab = self.m.alpha_bar(s), self.m.one_minus_alpha_bar(s)
        return (omab.sqrt() * (x.to(F64) - ab.sqrt() * MU) / (ab * VAR + omab)).to(x.dtype)


def spectrum(H=8, W=8):
    """An even, strictly positive spectrum spanning three decades (Gaussian images, zero mean)."""
    ky, kx = torch.meshgrid(torch.fft.fftfreq(H, dtype=F64), torch.fft.fftfreq(W, dtype=F64), indexing="ij")
    return 0.02 + 3.0 / (0.05 + (ky ** 2 + kx ** 2).sqrt()) ** 1.5 / 40


class SPDNet:
    """E[eps | x_s] per frequency for Gaussian images with spectrum S: sqrt(1 - abar) U / (abar S + 1 - abar)."""

    def __init__(self, method):
        self.m = method

    def __call__(self, x, label, cond=None):
        s = label.to(F64)[0] / self.m.label_scale
        ab, omab = self.m.alpha_bar(s), self.m.one_minus_alpha_bar(s)
        return self.m.combine((x.to(F64), omab.sqrt() / (ab * self.m.spectrum + omab))).to(x.dtype)


# ------------------------------------------------------------------------------------- shared contracts
def check_guidance_and_nfe(solver):
    """N steps are N network calls; guidance w mixes the conditional and unconditional data predictions
    (every method's prediction is affine in the net output), so w = 0 is the unconditional solve."""
    m = EDM(sigma_max=20.0)
    calls = []

    def net(x, c_noise, cond=None):
        calls.append(x.shape[0])
        shift = cond["class"][:, :1].reshape(-1, 1) if cond else 0.0
        return 0.3 * x + shift

    noise = m.prior_sample((3, 2), generator=gens(3))
    out = m.solve(net, noise, steps=7, solver=solver, cond={"class": torch.ones(3, 2)}, guidance=0.0)
    assert out.nfe == m.nfe(7, solver) == 7 and calls == [6] * 7  # both branches in one batch
    uncond = m.solve(net, noise, steps=7, solver=solver, cond={"class": torch.zeros(3, 2)})
    torch.testing.assert_close(out.x, uncond.x)


def check_rounding_level_sigma_is_the_data_end(solver):
    """A path whose sigma(1) is cos(pi/2) = 6e-17 in float64 ends at sigma = 0 (infinite lambda): the solve
    equals the one on the exact path, on both the method's grid and the log-SNR grid."""
    class Rounded(FlowMatching):
        def alpha_sigma(self, t):
            alpha, sigma = super().alpha_sigma(t)
            return alpha, torch.where(sigma == 0, torch.full_like(sigma, 6.1e-17), sigma)

    exact, rounded = FlowMatching("cosine"), Rounded("cosine")
    x0 = exact.prior_sample((4, 4), generator=gens(4)).to(F64)
    for schedule in ("model", "logsnr"):
        a = exact.solve(FlowNet(exact), x0, steps=8, solver=solver, schedule=schedule).x
        b = rounded.solve(FlowNet(exact), x0, steps=8, solver=solver, schedule=schedule).x
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
