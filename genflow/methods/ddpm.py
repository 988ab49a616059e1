"""DDPM: Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models" (NeurIPS 2020), cosine schedule:
Nichol & Dhariwal, "Improved DDPM" (ICML 2021), in continuous time s in [0, 1] on the VP engine
``genflow.methods.vp.VPDiffusion`` (loss, ancestral chain, probability-flow ODE, prior). Equation -> function:

- linear beta(s) = b0 + s (b1 - b0), b0 = 0.1, b1 = 20 (Ho et al.'s 1e-4..0.02 at T = 1000),
  abar = exp(-b0 s - (b1 - b0) s^2 / 2)                                 -> ``DDPM.alpha_bar``, ``DDPM.rate``
- cosine abar = cos^2(theta(s)) / cos^2(theta(0)), theta = (s + 0.008) / 1.008 * pi / 2
                                                                        -> ``DDPM.alpha_bar``, ``DDPM.rate``
- Gaussian marginal x_s = sqrt(abar) x + sqrt(1 - abar) eps (the sigma0-perturbed likelihood's map)
                                                                        -> ``DDPM.gaussian_marginal``
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from genflow.errors import config_error
from genflow.methods.base import GaussianMarginal
from genflow.methods.vp import VPDiffusion


class DDPM(VPDiffusion):
    """Isotropic VP diffusion (DDPM) with the linear or cosine schedule in continuous time s in [0, 1]."""

    SCHEDULES = ("linear", "cosine")

    def __init__(self, schedule: str = "linear", T: int = 1000, beta_min: float = 0.1, beta_max: float = 20.0,
                 cosine_s: float = 0.008, label_scale: float = 1000.0, time_sampling: str = "continuous",
                 ode_grid: str = "uniform", rho: float = 7.0):
        super().__init__(T=T, label_scale=label_scale, time_sampling=time_sampling, ode_grid=ode_grid, rho=rho)
        if schedule not in self.SCHEDULES:
            raise config_error(f"schedule={schedule!r} is unknown", "DDPM implements Ho et al.'s linear and "
                               "Nichol & Dhariwal's cosine schedules", "use schedule=linear or schedule=cosine")
        if not 0 < beta_min < beta_max:
            raise config_error(f"beta_min={beta_min}, beta_max={beta_max} are not 0 < beta_min < beta_max",
                               "the linear schedule's rate grows from beta_min to beta_max",
                               "use beta_min=0.1, beta_max=20 (Ho et al.'s 1e-4..0.02 at T=1000)")
        if not 0 < cosine_s < 1:
            raise config_error(f"cosine_s={cosine_s} is not in (0, 1)", "it offsets the cosine so abar'(0) is finite",
                               "use cosine_s=0.008 (Nichol & Dhariwal)")
        self.schedule, self.beta_min, self.beta_max, self.cosine_s = schedule, float(beta_min), float(beta_max), \
            float(cosine_s)
        self._theta0 = self.cosine_s / (1 + self.cosine_s) * (math.pi / 2)
        self._build_tables()

    @property
    def coef_shape(self) -> tuple[int, ...]:
        return ()

    def _theta(self, s: Tensor) -> Tensor:
        return (s + self.cosine_s) / (1 + self.cosine_s) * (math.pi / 2)

    def _log_alpha_bar(self, s: Tensor) -> Tensor:
        if self.schedule == "linear":
            return -(self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s * s)
        return 2 * (self._theta(s).cos().log() - math.log(math.cos(self._theta0)))

    def log_alpha_bar(self, s) -> Tensor:
        return self._log_alpha_bar(self._s(s, self.trained_T.device))

    def alpha_bar(self, s) -> Tensor:
        s = self._s(s, self.trained_T.device)
        if self.schedule == "cosine":
            return (self._theta(s).cos() / math.cos(self._theta0)) ** 2
        return self._log_alpha_bar(s).exp()

    def one_minus_alpha_bar(self, s) -> Tensor:
        s = self._s(s, self.trained_T.device)
        if self.schedule == "linear":
            return -torch.expm1(self._log_alpha_bar(s))
        # cos^2 a - cos^2 b = sin(b - a) sin(b + a), with a = theta(s), b = theta(0)
        th, th0 = self._theta(s), self._theta0
        return (th - th0).sin() * (th + th0).sin() / math.cos(th0) ** 2

    def rate(self, s) -> Tensor:
        s = self._s(s, self.trained_T.device)
        if self.schedule == "linear":
            return self.beta_min + (self.beta_max - self.beta_min) * s
        return math.pi / (1 + self.cosine_s) * self._theta(s).tan()

    def prior_variance(self) -> Tensor:
        # abar(s_hi) is ~4e-5 (linear, T=1000), so the marginal there is N(0, I) up to that fraction of data
        return torch.ones((), dtype=torch.float64, device=self.trained_T.device)

    def gaussian_marginal(self) -> GaussianMarginal:
        """x_s = sqrt(abar) x + sqrt(1 - abar) eps; the clean likelihood starts at the grid's data end s_lo."""
        return GaussianMarginal(f"DDPM/{self.schedule}", alpha=lambda s: math.sqrt(float(self.alpha_bar(s))),
                                sigma=lambda s: math.sqrt(float(self.one_minus_alpha_bar(s))), t_data=0.0,
                                t_prior=self.s_hi, t_clean=self.s_lo)

    def describe(self) -> dict:
        return {**super().describe(), "schedule": self.schedule}

    def hparams(self) -> dict:
        out = {"schedule": self.schedule}
        out.update(super().hparams())
        if self.schedule == "linear":
            out.update(beta_min=self.beta_min, beta_max=self.beta_max)
        else:
            out["cosine_s"] = self.cosine_s
        return out
