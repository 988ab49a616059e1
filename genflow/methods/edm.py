"""EDM: Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models" (NeurIPS 2022), as the D -> infinity member of the PFGM++ family (``genflow.methods.pfgmpp``).

Paper equation -> function:

- Preconditioning (Table 1, "Ours"): c_skip = sd^2/(s^2+sd^2), c_out = s*sd/sqrt(s^2+sd^2),
  c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4 with sd = sigma_data = 0.5  -> ``EDM.preconditioning``
- Denoiser D(x; s) = c_skip x + c_out F(c_in x; c_noise)  (Eq. 7)            -> ``EDM.denoise``
- Loss weight lambda(s) = (s^2+sd^2)/(s*sd)^2, so lambda c_out^2 = 1        -> ``EDM.loss_weight``
- Training noise levels ln(s) ~ N(P_mean, P_std^2) = N(-1.2, 1.2^2)         -> ``EDM.loss``
- Loss E ||lambda^(1/2) (D(y+n; s) - y)||^2, summed over data dimensions    -> ``EDM.loss``
- Perturbation kernel n ~ N(0, s^2 I)                                      -> ``EDM.perturb``
- Probability-flow ODE with sigma(t) = t, s(t) = 1: dx/ds = (x - D(x; s))/s  -> ``EDM.velocity``
- Time steps (Eq. 5): s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, s_n = 0
                                                                           -> ``EDM.time_grid``
- Algorithm 1 (deterministic Heun, no correction on the step to s = 0)     -> ``solver="heun"`` with
  ``solver_options`` (NFE = 2 steps - 1: 35 for 18 steps)
- Algorithm 2 (stochastic: churn gamma_i = min(S_churn/N, sqrt(2) - 1) on S_tmin <= s_i <= S_tmax,
  s^ = s_i (1 + gamma_i), x^ = x_i + sqrt(s^2 - s_i^2) S_noise eps, then Heun from s^ to s_{i+1})
                                                                           -> ``stochastic_sampler``
- Prior x_0 ~ N(0, s_max^2 I)                                              -> ``EDM.prior_sample``

Everything that depends on the perturbation kernel goes through three hooks (``_kernel_scale``,
``_log_kernel``, ``_input_variance``); ``PFGMPP`` overrides only those, so PFGM++ with D = inf runs
this exact code and is bit-identical to EDM.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from genflow import solvers
from genflow.errors import config_error
from genflow.methods.base import Cond, GaussianMarginal, Generators, Method, randn


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise config_error(f"{name}={value!r} is not a positive finite number",
                           f"{name} is a scale of the noise schedule; the preconditioning divides by it",
                           f"set {name} to a positive number (EDM default shown in configs/model/edm.yaml)")
    return float(value)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample values (B,) shaped to broadcast over every data dimension of x (B, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _churn(S_churn, S_tmin, S_tmax, S_noise) -> dict:
    """Algorithm 2's settings, checked (the paper's ImageNet-64: 40, 0.05, 50, 1.003)."""
    values = {"S_churn": S_churn, "S_tmin": S_tmin, "S_tmax": S_tmax, "S_noise": S_noise}
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise config_error(f"{name}={v!r} is not a non-negative number",
                               "it is a setting of EDM's stochastic sampler (Algorithm 2)",
                               "use the paper's values, e.g. S_churn=40 S_tmin=0.05 S_tmax=50 S_noise=1.003")
    if S_tmin > S_tmax:
        raise config_error(f"S_tmin={S_tmin} exceeds S_tmax={S_tmax}", "churn applies on S_tmin <= sigma <= S_tmax",
                           "choose S_tmin <= S_tmax")
    return {k: float(v) for k, v in values.items()}


CHURN = ("S_churn", "S_tmin", "S_tmax", "S_noise")


@solvers.register("stochastic", nfe=lambda steps, **_: solvers.ode_nfe("heun", steps, final_correction=False),
                  options=CHURN)
def stochastic_sampler(method: "EDM", net: Callable, noise: Tensor, *, steps: int, cond: Cond = None,
                       generator: Generators = None, callback=None, S_churn: float = 0.0, S_tmin: float = 0.0,
                       S_tmax: float = math.inf, S_noise: float = 1.0) -> solvers.Solution:
    """EDM's Algorithm 2 on ``method.time_grid(steps)`` (sigma_0 > ... > sigma_{N-1} = sigma_min, sigma_N = 0).

    The churn noise eps ~ N(0, S_noise^2 I) comes from ``generator`` (one per sample), so image i depends
    only on its seed; it is drawn in float64, the state's dtype, as EDM's generate.py draws it (its
    ``randn_like`` of the float64 state), so the same seeds give generate.py's images. S_churn = 0 is
    Algorithm 1. State and update arithmetic in float64."""
    grid = method.time_grid(steps, device=noise.device)
    gamma_max = min(S_churn / steps, math.sqrt(2) - 1) if steps > 0 else 0.0
    # which steps churn, decided on the host once (not a device read per step)
    gammas = [gamma_max if S_tmin <= sigma <= S_tmax else 0.0 for sigma in grid.tolist()]
    dtype, x, nfe = noise.dtype, noise.to(torch.float64), 0

    def d(state: Tensor, sigma: Tensor) -> Tensor:
        return method.velocity(net, state.to(dtype), sigma, cond).to(torch.float64)

    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        t_hat = t_cur + gammas[i] * t_cur
        if gamma_max > 0:  # drawn on every step, as in Algorithm 2, whatever the churn range; S_churn = 0 draws none
            eps = randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * eps
        # the last step ends at sigma = 0: no correction there
        x, evaluations = solvers.heun_step(d, x, t_hat, t_next, correct=i < steps - 1)
        nfe += evaluations
        if callback is not None:
            callback({"i": i, "t": t_next, "x": x})
    return solvers.Solution(x.to(dtype), nfe)


class EDM(Method):
    """EDM preconditioned denoiser, log-normal training noise and Heun sampler for any data shape (B, ...)."""

    time_name = "sigma"
    #: augmented dimensions of the PFGM++ family; EDM is the D -> infinity member
    D: float = math.inf

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, S_churn: float = 0.0,
                 S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0):
        super().__init__()
        self.churn = _churn(S_churn, S_tmin, S_tmax, S_noise)
        self.sigma_min = _positive("sigma_min", sigma_min)
        self.sigma_max = _positive("sigma_max", sigma_max)
        self.rho = _positive("rho", rho)
        self.P_std = _positive("P_std", P_std)
        self.sigma_data = _positive("sigma_data", sigma_data)
        if isinstance(P_mean, bool) or not isinstance(P_mean, (int, float)) or not math.isfinite(P_mean):
            raise config_error(f"P_mean={P_mean!r} is not a finite number",
                               "ln(sigma) of the training noise levels is drawn from N(P_mean, P_std^2)",
                               "set P_mean to a real number (EDM: -1.2)")
        self.P_mean = float(P_mean)
        if self.sigma_min >= self.sigma_max:
            raise config_error(f"sigma_min={sigma_min} is not below sigma_max={sigma_max}",
                               "the sampler integrates from sigma_max down to sigma_min and then 0",
                               "choose sigma_min < sigma_max (EDM: 0.002 and 80)")

    # ----------------------------------------------------------------- kernel hooks (PFGM++ overrides)
    def _kernel_scale(self, sigma: Tensor, generator: Generators) -> Tensor:
        """Per-sample factor a with n = a * g, g ~ N(0, I): the Gaussian kernel has a = sigma."""
        return sigma

    def _log_kernel(self, sqnorm: Tensor, n: int, sigma: float) -> Tensor:
        """log N(x; 0, sigma^2 I) from ||x||^2 (float64)."""
        return -0.5 * n * math.log(2 * math.pi * sigma ** 2) - 0.5 * sqnorm / sigma ** 2

    def _input_variance(self, sigma: Tensor) -> Tensor:
        """Per-dimension noise variance assumed by c_in."""
        return sigma ** 2

    # ------------------------------------------------------------------------------ preconditioning
    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at noise level ``sigma`` (any shape, any float dtype)."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (self._input_variance(sigma) + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def _sigma_batch(self, sigma, x: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype)
        if sigma.ndim == 0:
            return sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        return sigma

    def denoise(self, net: Callable, x: Tensor, sigma, cond: Cond = None) -> Tensor:
        """D(x; sigma) = c_skip x + c_out net(c_in x, ln(sigma)/4, cond); sigma scalar or (B,)."""
        sigma = self._sigma_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = self.preconditioning(_bcast(sigma, x))
        out = net(c_in * x, c_noise.reshape(-1), self.net_cond(cond))
        return c_skip * x + c_out * out.to(x.dtype)

    def clean_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Clean data as the net sees it at sigma_min, the smallest level it is trained and sampled at:
        (c_in(sigma_min) x, c_noise(sigma_min))."""
        sigma = torch.full((x.shape[0],), self.sigma_min, device=x.device, dtype=x.dtype)
        _, _, c_in, c_noise = self.preconditioning(_bcast(sigma, x))
        return c_in * x, c_noise.reshape(-1)

    # -------------------------------------------------------------------------------- training
    def perturb(self, y: Tensor, sigma, generator: Generators = None) -> Tensor:
        """x = y + n with n drawn from the perturbation kernel at ``sigma`` (scalar or (B,)), on y's device."""
        sigma = self._sigma_batch(sigma, y)
        g = randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return y + g * _bcast(self._kernel_scale(sigma, generator), y)

    def loss(self, net: Callable, x: Tensor, cond: Cond = None) -> Tensor:
        sigma = (torch.randn(x.shape[0], device=x.device, dtype=x.dtype) * self.P_std + self.P_mean).exp()
        denoised = self.denoise(net, self.perturb(x, sigma), sigma, cond)
        weight = _bcast(self.loss_weight(sigma), x)
        # per-sample sum over data dimensions (the reference code's loss.sum() / batch), not a mean
        return (weight * (denoised - x) ** 2).flatten(1).sum(1)

    # ------------------------------------------------------------------------------------ prior
    def prior_sample(self, shape: Sequence[int], *, generator: Generators = None, device=None) -> Tensor:
        """The kernel at sigma_max around the origin (the same sigma_max the time grid starts at)."""
        g = randn(shape, generator=generator, device=device, dtype=torch.float32)
        sigma = torch.full((shape[0],), self.sigma_max, device=g.device, dtype=g.dtype)
        return g * _bcast(self._kernel_scale(sigma, generator), g)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """Analytic log-density of the prior, (B,) float64; differentiable in x (maximum likelihood
        backpropagates through the end state of the ODE into the network)."""
        flat = x.to(torch.float64).flatten(1)
        return self._log_kernel((flat ** 2).sum(1), flat.shape[1], self.sigma_max)

    # ---------------------------------------------------------------------------------- sampling
    def time_grid(self, steps: int, device=None) -> Tensor:
        """Karras et al. Eq. 5 in float64: ``steps`` noise levels from sigma_max to sigma_min, then 0."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise config_error(f"steps={steps!r} is not a positive integer",
                               "the sampler needs at least one step from sigma_max to 0",
                               "pass steps >= 1 (EDM uses 18 for CIFAR-10, 40 for 64x64 data)")
        if steps == 1:
            sig = torch.tensor([self.sigma_max], dtype=torch.float64, device=device)
        else:
            i = torch.arange(steps, dtype=torch.float64, device=device)
            lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            sig = (hi + i / (steps - 1) * (lo - hi)) ** self.rho
        return torch.cat([sig, sig.new_zeros(1)])

    def velocity(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """dx/dsigma = (x - D(x; sigma)) / sigma, the PF ODE of every D (r = sigma sqrt(D) cancels)."""
        sigma = self._sigma_batch(t, x)
        return (x - self.denoise(net, x, sigma, cond)) / _bcast(sigma, x)

    def solvers(self) -> tuple[str, ...]:
        return (*solvers.ODE_SOLVERS, "stochastic")

    def check_solver(self, solver: str, key: str = "solver", options=None) -> str:
        """Also: a churn (the model's own S_churn or ``options``) only for the stochastic sampler, and valid."""
        super().check_solver(solver, key, options)
        if self.churn["S_churn"] > 0 and solver != "stochastic":
            offered = "stochastic" in self.solvers()
            raise config_error(f"model.S_churn={self.churn['S_churn']:g} with {key}={solver}",
                               f"the churn belongs to the stochastic sampler (Algorithm 2); {solver} would silently "
                               "ignore it", (f"use {key}=stochastic, or " if offered else "set ") +
                               "model.S_churn=0 (sample.py takes the churn on its command line: solver=stochastic "
                               "S_churn=40 ...)")
        if options and solver == "stochastic":
            _churn(**{**self.churn, **{k: v for k, v in options.items() if k in CHURN}})
        return solver

    def solver_options(self, solver: str) -> dict:
        """Algorithm 1: no Heun correction on the step to sigma = 0; dopri5 integrates to sigma_min and
        takes that last step with Euler (x = D(x; sigma_min)); ``stochastic``: the churn settings."""
        if solver == "heun":
            return {"final_correction": False}
        if solver == "dopri5":
            return {"final_euler": True}
        if solver == "stochastic":
            return dict(self.churn)
        return {}

    # -------------------------------------------------------------------------------- likelihood
    def likelihood_interval(self) -> tuple[float, float]:
        """From sigma_min (the ODE is singular at sigma = 0) to sigma_max."""
        return self.sigma_min, self.sigma_max

    def gaussian_marginal(self) -> GaussianMarginal | None:
        """x_sigma = x + sigma eps: alpha = 1, and sigma0 is reached at t0 = sigma0."""
        return GaussianMarginal(type(self).__name__, alpha=lambda t: 1.0, sigma=lambda t: t, t_data=0.0,
                                t_prior=self.sigma_max, t_clean=self.sigma_min, closed_form=lambda s: s)

    def describe(self) -> dict:
        return {"method": "EDM", "D": "inf"}  # the D -> infinity member of the PFGM++ family

    def hparams(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho, "P_mean": self.P_mean,
                "P_std": self.P_std, "sigma_data": self.sigma_data, **self.churn}
