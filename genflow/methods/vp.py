"""The variance-preserving (VP) diffusion engine shared by DDPM (``genflow.methods.ddpm``) and shortest-path
diffusion (``genflow.methods.spd``): a VP forward process whose signal fraction abar(s) is either one
number (isotropic, DDPM) or one number per 2-D frequency (SPD). Time s runs from 0 (data) to 1 (noise).
Equation -> function:

- Forward kernel u_k(s) = sqrt(abar_k(s)) u_k(0) + sqrt(1 - abar_k(s)) eps_k, u = F x with the
  orthonormal 2-D FFT and eps = F xi, xi ~ N(0, I) in pixels            -> ``VPDiffusion.q_sample``
- Rate beta_k(s) = -d ln abar_k / ds (the VP SDE du = -beta u/2 ds + sqrt(beta) dW)
                                                                        -> ``rate`` (subclasses)
- Loss ||xi - eps_theta(x_s, label(s))||^2 summed over pixels, s ~ U[1/T, 1 - 1/T] (or the discrete
  grid), no weighting (Ho et al. L_simple)                              -> ``VPDiffusion.loss``
- Discrete grid s_j = t_j / T, t = linspace(1, T-1, T) (the SPD reference code's grid; both ends
  excluded), tables abar_j and beta_j = 1 - abar_j / abar_{j-1}         -> ``grid_times``, ``_build_tables``
- Ancestral step (Ho et al. Alg. 2, per frequency, fixed-large variance sigma^2 = beta_j):
  x <- F^-1[(U - beta_j / sqrt(1 - abar_j) E) / sqrt(1 - beta_j) + sqrt(beta_j) F z]
                                                                        -> ``reverse_mean``, ``ancestral_sampler``
- Probability-flow ODE dx/ds = F^-1[-beta/2 U + beta / (2 sqrt(1 - abar)) E], E = F eps_theta
  (the score is -F^-1[E / sqrt(1 - abar)])                              -> ``VPDiffusion.velocity``
- Data prediction x0 = F^-1[(U - sqrt(1 - abar) E) / sqrt(abar)] and the per-frequency path
  (alpha_k, sigma_k) = (sqrt(abar_k), sqrt(1 - abar_k)): DPM-Solver++ with lambda_k per frequency
                                                                        -> ``data_prediction``, ``alpha_sigma``
- Prior at s_hi = 1 - 1/T: N(0, F^-1 diag(lambda) F), lambda the marginal variance there
                                                                        -> ``prior_sample``, ``prior_log_prob``

Network label: ``net(x, label_scale * s, cond)`` with label_scale = 1000, i.e. the reference code's
``t * 1000 / T`` (``rescale_timesteps``) in continuous time and EDM's VP c_noise = 999 t scale.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from typing import Callable, Sequence

import torch
from torch import Tensor

from genflow import solvers
from genflow.errors import CheckpointError, config_error
from genflow.methods.base import Cond, Generators, Method, randn

#: the reference code clamps discrete betas at 0.999; a schedule that needs the clamp has too few steps
BETA_MAX = 0.999


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 3:
        raise config_error(f"T={T!r} is too small (must be an integer >= 3)",
                           "the discrete grid t = linspace(1, T-1, T) / T needs at least three interior times; "
                           "the network label and the ancestral sampler both live on it",
                           "set model.T to the number of diffusion steps, e.g. 1000 (SPD reference: 4000)")
    return T


class VPDiffusion(Method):
    """VP diffusion whose abar(s) is a scalar (isotropic) or a per-frequency table (Fourier-diagonal).

    Subclasses provide ``alpha_bar``/``one_minus_alpha_bar``/``rate`` (float64, closed form), the
    ``coef_shape`` of their schedule (``()`` if isotropic) and ``prior_variance``.
    """

    time_name = "s"

    GRIDS = ("uniform", "karras")

    def __init__(self, T: int = 1000, label_scale: float = 1000.0, time_sampling: str = "continuous",
                 ode_grid: str = "uniform", rho: float = 7.0):
        super().__init__()
        if ode_grid not in self.GRIDS:
            raise config_error(f"ode_grid={ode_grid!r} is unknown", "the ODE samplers step on a uniform grid in s "
                               "or on Karras et al.'s rho-spacing of sigma(s) = sqrt(s / (1 - s))",
                               "use ode_grid=uniform or ode_grid=karras")
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise config_error(f"rho={rho!r} is not positive", "it is the exponent of the Karras spacing",
                               "use rho=7 (EDM)")
        self.ode_grid, self.rho = ode_grid, float(rho)
        self.T = _check_T(T)
        if not (isinstance(label_scale, (int, float)) and math.isfinite(label_scale) and label_scale > 0):
            raise config_error(f"label_scale={label_scale!r} is not a positive number",
                               "the network sees label_scale * s as its noise label",
                               "use label_scale=1000 (the reference t * 1000 / T convention)")
        if time_sampling not in ("continuous", "discrete"):
            raise config_error(f"time_sampling={time_sampling!r} is unknown",
                               "training times are drawn uniformly on [1/T, 1-1/T] or on the T-point grid",
                               "use time_sampling=continuous (default) or discrete (reference code)")
        self.label_scale = float(label_scale)
        self.time_sampling = time_sampling
        # persistent so that a checkpoint knows the T it was trained with
        self.register_buffer("trained_T", torch.tensor(T, dtype=torch.int64))
        self.register_buffer("alphas_cumprod", torch.empty(0, dtype=torch.float64), persistent=False)
        self.register_buffer("betas", torch.empty(0, dtype=torch.float64), persistent=False)

    # -------------------------------------------------------------------------- schedule (subclass)
    @property
    @abstractmethod
    def coef_shape(self) -> tuple[int, ...]:
        """Shape of abar at one time: () for isotropic schedules, the spectrum's shape otherwise."""

    @abstractmethod
    def alpha_bar(self, s) -> Tensor:
        """abar(s) in float64, shape ``s.shape + coef_shape``."""

    def log_alpha_bar(self, s) -> Tensor:
        """ln abar(s), float64; subclasses override it where ln(abar) is more precise than abar."""
        return self.alpha_bar(s).log()

    @abstractmethod
    def one_minus_alpha_bar(self, s) -> Tensor:
        """1 - abar(s) without cancellation, float64."""

    @abstractmethod
    def rate(self, s) -> Tensor:
        """beta(s) = -d ln abar / ds in float64 (diverges as s -> 1)."""

    @abstractmethod
    def prior_variance(self) -> Tensor:
        """Marginal variance (per frequency, or scalar) at ``s_hi`` used by the prior, float64."""

    @property
    def per_frequency(self) -> bool:
        return len(self.coef_shape) > 0

    @property
    def ready(self) -> bool:
        return True

    # -------------------------------------------------------------------------------- time grid
    @property
    def s_lo(self) -> float:
        return 1.0 / self.T

    @property
    def s_hi(self) -> float:
        return (self.T - 1.0) / self.T

    def grid_times(self, device=None) -> Tensor:
        """The T discrete times s_j = t_j / T, t = linspace(1, T-1, T) (data end first), float64."""
        return torch.linspace(1, self.T - 1, self.T, dtype=torch.float64, device=device) / self.T

    def _s(self, s, device=None) -> Tensor:
        return torch.as_tensor(s, dtype=torch.float64, device=device)

    def _build_tables(self) -> None:
        """abar_j on the grid and beta_j = 1 - abar_j / abar_{j-1} (abar_{-1} = 1), float64; beta from
        differences of ln abar so that betas far below float64's epsilon stay positive."""
        device = self.trained_T.device
        log_ab = self.log_alpha_bar(self.grid_times(device))
        prev = torch.cat([torch.zeros_like(log_ab[:1]), log_ab[:-1]])
        betas = -torch.expm1(log_ab - prev)
        if not bool(torch.isfinite(betas).all()):
            raise config_error("the discrete schedule has non-finite betas",
                               "the spectrum or schedule parameters overflow float64",
                               "check the spectrum for zeros/infinities (SPD floors it at `floor`)")
        worst = float(betas.max())
        if worst > BETA_MAX:
            raise config_error(f"T={self.T} is too small for this schedule: a discrete beta reaches {worst:.4f}",
                               f"betas above {BETA_MAX} must be clamped (as the reference code does), after which "
                               "the discrete chain no longer follows the closed-form abar(s)",
                               "increase model.T (the SPD reference uses 4000)")
        self.alphas_cumprod = log_ab.exp()
        self.betas = betas

    # --------------------------------------------------------------------------- filtering helpers
    def _bcast(self, c: Tensor, x: Tensor) -> Tensor:
        """Coefficients of shape batch + coef_shape (batch = () or (B,)) broadcast against x (B, ...)."""
        if c.ndim == len(self.coef_shape):
            return c
        return c.reshape(c.shape[0], *([1] * (x.ndim - 1 - len(self.coef_shape))), *self.coef_shape)

    def combine(self, *pairs: tuple[Tensor, Tensor]) -> Tensor:
        """sum_i F^-1(c_i * F x_i) (``Method.combine``: per-frequency coefficients act in the Fourier basis);
        isotropic schedules skip the FFT (the filter is a scalar).

        Per-frequency coefficients are even in k (``SPD.set_spectrum`` enforces it) and the inputs are
        real, so the products are Hermitian: the half-spectrum rfft2/irfft2 pair gives the exact real
        result at half the cost of fft2/ifft2."""
        x0 = pairs[0][0]
        if not self.per_frequency:
            coefs = [self._bcast(c, x0).to(x0.dtype) for _, c in pairs]
            out = coefs[0] * pairs[0][0]
            for (x, _), c in zip(pairs[1:], coefs[1:]):
                out = out + c * x
            return out
        # transforms in float64: the FFT's rounding depends on how many images it batches (vectorised vs
        # scalar code paths); in float32 that ~1e-6 would make image i depend on its batch
        f64 = torch.float64
        half = x0.shape[-1] // 2 + 1
        X = torch.fft.rfft2(torch.stack([x.to(f64) for x, _ in pairs]), norm="ortho")
        coefs = [self._bcast(c, x0).to(f64) for _, c in pairs]
        out = coefs[0][..., :half] * X[0]
        for i in range(1, len(pairs)):
            out = out + coefs[i][..., :half] * X[i]
        return torch.fft.irfft2(out, s=x0.shape[-2:], norm="ortho").to(x0.dtype)

    def _check_data(self, x: Tensor) -> None:
        if not self.ready:
            raise config_error(f"{type(self).__name__} has no schedule yet",
                               "its spectrum is estimated from data by prepare(datamodule) or restored from a checkpoint",
                               "pass spectrum=..., call method.prepare(datamodule) or use SPD.from_data(images)")
        cs = self.coef_shape
        if not cs:
            return
        if x.ndim != 4 or tuple(x.shape[-2:]) != cs[-2:] or (len(cs) == 3 and cs[0] not in (1, x.shape[1])):
            raise config_error(f"data of shape {tuple(x.shape[1:])} does not match the spectrum of shape {cs}",
                               "the schedule has one abar per channel and 2-D frequency of the training images",
                               "estimate the spectrum from this data (prepare / SPD.from_data) or pass a spectrum "
                               "of shape (H, W) or (C, H, W) matching the images")

    def noise_label(self, s: Tensor) -> Tensor:
        """What the network sees: label_scale * s as float32, shape (B,)."""
        return (self.label_scale * s).to(torch.float32)

    def clean_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Clean data as the net sees it at the data end of the grid, s_lo = 1/T: x itself (VP inputs
        are not rescaled) with the label of s_lo."""
        return x, self.noise_label(torch.full((x.shape[0],), self.s_lo, dtype=torch.float64, device=x.device))

    # -------------------------------------------------------------------------------- training
    def q_sample(self, x0: Tensor, s, noise: Tensor) -> Tensor:
        """x_s = F^-1[sqrt(abar(s)) F x0 + sqrt(1 - abar(s)) F noise]; s scalar or (B,)."""
        self._check_data(x0)
        s = self._s(s, x0.device)
        return self.combine((x0, self.alpha_bar(s).sqrt()), (noise, self.one_minus_alpha_bar(s).sqrt()))

    def sample_training_times(self, batch: int, device=None) -> Tensor:
        if self.time_sampling == "discrete":
            return self.grid_times(device)[torch.randint(self.T, (batch,), device=device)]
        u = torch.rand(batch, dtype=torch.float64, device=device)
        return self.s_lo + (self.s_hi - self.s_lo) * u

    def loss(self, net: Callable, x: Tensor, cond: Cond = None, *, s: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Per-sample ||xi - eps_theta(x_s)||^2 summed over pixels (equal to the Fourier sum by Parseval)."""
        self._check_data(x)
        s = self.sample_training_times(x.shape[0], x.device) if s is None else self._s(s, x.device).expand(x.shape[0])
        noise = torch.randn_like(x) if noise is None else noise
        x_s = self.q_sample(x, s, noise)
        eps = net(x_s, self.noise_label(s), self.net_cond(cond))
        return (eps.to(x.dtype) - noise).square().flatten(1).sum(1)

    # ------------------------------------------------------------------------------------ prior
    def prior_sample(self, shape: Sequence[int], *, generator: Generators = None, device=None) -> Tensor:
        z = randn(shape, generator=generator, device=device, dtype=torch.float32)
        if not self.per_frequency:
            return z * self.prior_variance().sqrt().to(z.dtype)
        self._check_data(z)
        return self.combine((z, self.prior_variance().to(z.device).sqrt()))

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, F^-1 diag(lambda) F), (B,) float64: the FFT is unitary, so the quadratic form is
        sum_k |U_k|^2 / lambda_k and log det = sum_k ln lambda_k over every channel and grid index.
        Differentiable in x, for maximum-likelihood training."""
        x = x.to(torch.float64)
        lam = self.prior_variance().to(x.device)
        n = x[0].numel()
        if self.per_frequency:
            self._check_data(x)
            U2 = torch.fft.fft2(x, norm="ortho").abs().square()
            quad = (U2 / lam).flatten(1).sum(1)
            logdet = lam.log().expand(x.shape[1:]).sum()
        else:
            quad = x.square().flatten(1).sum(1) / lam
            logdet = n * lam.log()
        return -0.5 * (quad + logdet + n * math.log(2 * math.pi))

    # ---------------------------------------------------------------------------------- sampling
    def time_grid(self, steps: int, device=None) -> Tensor:
        """``steps + 1`` times from s_hi = 1 - 1/T to s_lo = 1/T, float64 (the reference grid's ends,
        where the rate beta ~ 1/(1-s) and 1/sqrt(1 - abar) stay finite).

        ``uniform``: equal steps in s, i.e. equal Fisher arc length on the SPD path (constant speed).
        ``karras``: EDM's rho-spacing of sigma(s) = sqrt(s / (1 - s)) (1/sigma^2 is a logistic SNR
        proxy), which puts short steps where beta ~ 1/(1-s) amplifies eps errors and near the data."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise config_error(f"steps={steps!r} is not a positive integer",
                               "the sampler needs at least one step from noise to data",
                               f"pass steps >= 1 (ancestral: up to T={self.T})")
        if self.ode_grid == "uniform":
            return torch.linspace(self.s_hi, self.s_lo, steps + 1, dtype=torch.float64, device=device)
        sig = lambda s: math.sqrt(s / (1 - s))
        hi, lo = sig(self.s_hi) ** (1 / self.rho), sig(self.s_lo) ** (1 / self.rho)
        i = torch.arange(steps + 1, dtype=torch.float64, device=device)
        sigma2 = (hi + i / steps * (lo - hi)) ** (2 * self.rho)
        grid = sigma2 / (1 + sigma2)
        grid[0], grid[-1] = self.s_hi, self.s_lo
        return grid

    def _s_batch(self, t, x: Tensor) -> Tensor:
        s = self._s(t, x.device)
        return s.expand(x.shape[0]) if s.ndim == 0 else s

    def velocity(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """Probability-flow ODE dx/ds = F^-1[-beta/2 U + beta / (2 sqrt(1 - abar)) F eps_theta]."""
        self._check_data(x)
        s = self._s_batch(t, x)
        beta = self.rate(s)
        eps = net(x, self.noise_label(s), self.net_cond(cond)).to(x.dtype)
        return self.combine((x, -0.5 * beta), (eps, 0.5 * beta / self.one_minus_alpha_bar(s).sqrt()))

    def reverse_mean(self, x: Tensor, eps: Tensor, abar: Tensor, abar_prev: Tensor) -> Tensor:
        """Mean of p(x_{j-1} | x_j): F^-1[(U - beta/sqrt(1 - abar) E) / sqrt(alpha)], alpha = abar / abar_prev.

        With the true eps this is the posterior mean of q(x_{j-1} | x_j, x_0) per frequency."""
        alpha = abar / abar_prev
        beta = 1 - alpha
        return self.combine((x, alpha.rsqrt()), (eps, -beta / ((1 - abar).sqrt() * alpha.sqrt())))

    def _respaced(self, steps: int, device) -> Tensor:
        """Indices of the grid the ancestral sampler visits: all T of them, or an even subset."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.T:
            raise config_error(f"steps={steps!r} is not in 1..T={self.T} for the ancestral sampler",
                               "the ancestral chain runs on (a subset of) the T-point training grid",
                               f"use steps={self.T} (the paper's sampler) or fewer for a respaced chain")
        return torch.linspace(0, self.T - 1, steps, device=device).round().long()

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """(sqrt(abar(s)), sqrt(1 - abar(s))) at one time: scalars (DDPM) or one per frequency (SPD)."""
        s = self._s(t, self.trained_T.device)
        return (0.5 * self.log_alpha_bar(s)).exp(), self.one_minus_alpha_bar(s).sqrt()

    def data_prediction(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """x0 = F^-1[(U - sqrt(1 - abar) E) / sqrt(abar)] per frequency, E = F eps_theta."""
        self._check_data(x)
        s = self._s_batch(t, x)
        eps = net(x, self.noise_label(s), self.net_cond(cond)).to(x.dtype)
        alpha, sigma = self.alpha_sigma(s[0])
        return self.combine((x, 1 / alpha), (eps, -sigma / alpha))

    def solver_options(self, solver: str) -> dict:
        """The exponential integrators step uniformly in (mean) log-SNR rather than on the ODE grid (digits,
        NFE 10: dpmpp_2m DDPM FID 5.18 against 6.70 on the uniform s grid, SPD 3.16 against 3.49 on its
        rho-grid; unipc SPD 3.08 against 3.33, and DDPM 5.35 against 4.21 at NFE 10 but 5.18 against 6.04 at
        NFE 20: the uniform s grid's long end steps)."""
        return {"schedule": "logsnr"} if solver in solvers.EXPONENTIAL_SOLVERS else {}

    def solvers(self) -> tuple[str, ...]:
        return ("ancestral", *super().solvers())

    def describe(self) -> dict:
        return {"method": type(self).__name__, "T": self.T}

    # ------------------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "trained_T"
        if key in state_dict and int(state_dict[key]) != self.T:
            raise CheckpointError(
                f"the checkpoint was trained with T={int(state_dict[key])} but this {type(self).__name__} has "
                f"T={self.T}\n  why: the network learnt the noise labels and the sampler's grid of that T\n"
                f"  fix: set model.T={int(state_dict[key])}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def hparams(self) -> dict:
        out = {"T": self.T, "label_scale": self.label_scale, "time_sampling": self.time_sampling,
               "ode_grid": self.ode_grid}
        if self.ode_grid == "karras":
            out["rho"] = self.rho
        return out


@solvers.register("ancestral", nfe=lambda steps, **_: steps)
def ancestral_sampler(method: VPDiffusion, net: Callable, noise: Tensor, *, steps: int, cond: Cond = None,
                      generator: Generators = None, callback=None) -> solvers.Solution:
    """The per-frequency DDPM chain on the T-grid (``steps`` = T, or fewer for an evenly respaced chain),
    fixed-large variance; its noise comes from ``generator`` (one per sample for batch-independent images)."""
    method._check_data(noise)
    device = noise.device
    idx = method._respaced(steps, device)
    s_grid = method.grid_times(device)[idx]
    log_ab = method.log_alpha_bar(s_grid)
    log_alpha = log_ab - torch.cat([torch.zeros_like(log_ab[:1]), log_ab[:-1]])
    x = noise.to(torch.float64)
    cond = method.net_cond(cond)
    for i in range(idx.numel() - 1, -1, -1):
        s = s_grid[i].expand(x.shape[0])
        eps = net(x.to(noise.dtype), method.noise_label(s), cond).to(torch.float64)
        beta = -torch.expm1(log_alpha[i])
        inv_sqrt_alpha = (-0.5 * log_alpha[i]).exp()
        # reverse_mean, written with ln abar so tiny betas keep their precision
        terms = [(x, inv_sqrt_alpha), (eps, -beta * inv_sqrt_alpha / (-torch.expm1(log_ab[i])).sqrt())]
        if i > 0:  # fixed-large variance sigma_j^2 = beta_j; none on the last step
            z = randn(x.shape, generator=generator, device=device, dtype=noise.dtype).to(torch.float64)
            terms.append((z, beta.sqrt()))
        x = method.combine(*terms)  # one FFT round trip per step
        if callback is not None:
            callback({"i": idx.numel() - 1 - i, "t": s_grid[i], "x": x})
    return solvers.Solution(x.to(noise.dtype), idx.numel())
