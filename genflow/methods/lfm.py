"""Latent factor model X = g(Z) + sigma eps fitted by maximum likelihood: the estimator of Chae, Kim,
Kim & Lin, "A likelihood approach to nonparametric estimation of a singular distribution using deep
generative models" (JMLR 24(77), 2023), used with instance noise on the data (``data.instance_noise``).

Paper -> function:
- Model density p_{g,sigma}(x) = int N(x; g(z), sigma^2 I_D) dP_Z(z)          -> ``log_marginal``
  (d = 1: deterministic quadrature over P_Z's quantiles; d > 1: importance sampling with the prior as
  proposal, log (1/K) sum_k N(x; g(z_k), sigma^2 I), a lower bound in expectation)
- Sieve MLE: minimise -(1/n) sum log p_{g,sigma}(Y_i) over g and sigma       -> ``loss``
  on perturbed data Y_i = X_i + sigma~ eps_i (``genflow.likelihood.add_instance_noise`` or the
  datamodule's ``instance_noise``); without it sigma -> 0 and g fits the support, not the law.
- Estimate P^ = g^ # P_Z (the denoised generator law)                        -> ``sample``
- sigma is a learnable parameter (``log_sigma``), floored at ``sigma_floor``.

The decoder g is the framework's ``net`` (an ``MLP`` built for the data shape (D,)): the latent z
(B, d) is zero-padded to (B, D) and decoded as g(z) = net(pad(z), 0, None), which keeps the net
contract "output shaped like input". The prior therefore lives on the first d coordinates of a
D-vector: ``prior_sample((B, D))`` returns padded latents, ``sample`` decodes them in one network call.
The model has no probability-flow ODE; ``velocity`` refuses with an explanation.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from genflow import solvers
from genflow.errors import config_error
from genflow.methods.base import Cond, Generators, Method, randn

PRIORS = ("uniform", "normal")


class LatentFactorModel(Method):
    """X = g(Z) + sigma eps with Z ~ U[0,1]^d or N(0, I_d); ``loss`` is -log p_{g,sigma}(x) per sample."""

    time_name = "none"

    def __init__(self, latent_dim: int = 1, prior: str = "uniform", quadrature_nodes: int = 512,
                 importance_samples: int = 256, sigma_init: float = 0.1, sigma_floor: float = 0.0,
                 sample_noise: bool = False):
        super().__init__()
        if isinstance(latent_dim, bool) or int(latent_dim) != latent_dim or latent_dim < 1:
            raise config_error(f"latent_dim={latent_dim!r}", "the latent dimension d must be a positive integer",
                               "use model.latent_dim=1 for a curve such as the circle")
        if prior not in PRIORS:
            raise config_error(f"prior={prior!r}", f"the latent law P_Z is one of {PRIORS}",
                               "use model.prior=uniform (U[0,1]^d) or normal")
        for name, v in (("quadrature_nodes", quadrature_nodes), ("importance_samples", importance_samples)):
            if isinstance(v, bool) or int(v) != v or v < 2:
                raise config_error(f"{name}={v!r}", "the latent integral needs at least two nodes/samples",
                                   f"use e.g. {name}=512")
        if not (sigma_init > 0 and sigma_floor >= 0 and sigma_init > sigma_floor):
            raise config_error(f"sigma_init={sigma_init}, sigma_floor={sigma_floor}",
                               "sigma is a noise standard deviation above its floor",
                               "use sigma_init > sigma_floor >= 0, e.g. 0.1 and 0")
        self.latent_dim, self.prior = int(latent_dim), prior
        self.quadrature_nodes, self.importance_samples = int(quadrature_nodes), int(importance_samples)
        self.sigma_floor, self.sample_noise = float(sigma_floor), bool(sample_noise)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma_init - sigma_floor)))

    # ------------------------------------------------------------------------------------ model
    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp() + self.sigma_floor

    def _pad(self, z: Tensor, dim: int) -> Tensor:
        if dim < self.latent_dim:
            raise config_error(f"latent_dim={self.latent_dim} exceeds the data dimension {dim}",
                               "the decoder reads the latent from the first d coordinates of a data-shaped vector",
                               "use latent_dim <= the data dimension")
        return torch.nn.functional.pad(z, (0, dim - self.latent_dim))

    def decode(self, net: Callable, z: Tensor, dim: int) -> Tensor:
        """g(z): (M, d) latents -> (M, D) points."""
        zp = self._pad(z, dim)
        return net(zp, zp.new_zeros(zp.shape[0]), None)

    def _latents(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Latent nodes (M, d) and log-weights (M,) of the latent integral."""
        if self.latent_dim == 1:
            m = self.quadrature_nodes
            u = (torch.arange(m, device=x.device, dtype=torch.float64) + 0.5) / m
            z = u if self.prior == "uniform" else torch.special.ndtri(u)  # equal-mass quantile nodes
            return z[:, None].to(x.dtype), torch.full((m,), -math.log(m), device=x.device, dtype=x.dtype)
        k = self.importance_samples
        z = self.prior_sample((k, self.latent_dim), device=x.device).to(x.dtype)
        return z, torch.full((k,), -math.log(k), device=x.device, dtype=x.dtype)

    def log_marginal(self, net: Callable, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        """log p_{g,sigma}(x), (B,) nats; ``sigma`` defaults to the learnt one."""
        flat = x.flatten(1)
        dim = flat.shape[1]
        z, log_w = self._latents(flat)
        g = self.decode(net, z, dim).flatten(1)
        sigma = self.sigma if sigma is None else torch.as_tensor(sigma, dtype=flat.dtype, device=flat.device)
        sigma = sigma.to(flat.dtype)
        # the direct difference, not |x|^2 - 2 x.g + |g|^2: as sigma -> 0 the expansion's rounding dominates
        d2 = ((flat[:, None, :] - g[None]) ** 2).sum(-1)
        log_k = -0.5 * d2 / sigma ** 2 - 0.5 * dim * torch.log(2 * math.pi * sigma ** 2)
        return torch.logsumexp(log_k + log_w[None], 1)

    def loss(self, net: Callable, x: Tensor, cond: Cond = None) -> Tensor:
        """Negative log marginal likelihood per sample (nats)."""
        return -self.log_marginal(net, x)

    # ------------------------------------------------------------------------------------ prior
    def prior_sample(self, shape: Sequence[int], *, generator: Generators = None, device=None) -> Tensor:
        """Latents: shape (B, d) gives z; a data shape (B, D) gives z zero-padded to D (for ``sample``)."""
        b, dim = shape[0], int(math.prod(shape[1:]))
        if self.prior == "uniform":
            z = torch.rand((b, self.latent_dim), generator=generator, device=device) if (
                generator is None or isinstance(generator, torch.Generator)) else torch.stack(
                [torch.rand((self.latent_dim,), generator=g, device=device) for g in generator])
        else:
            z = randn((b, self.latent_dim), generator=generator, device=device)
        return self._pad(z, dim).reshape(tuple(shape))

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log P_Z density of the latent (first d coordinates of x), (B,) float64."""
        z = x.flatten(1)[:, : self.latent_dim].to(torch.float64)
        if self.prior == "normal":
            return (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(1)
        inside = ((z >= 0) & (z <= 1)).all(1)
        return torch.where(inside, torch.zeros_like(inside, dtype=torch.float64),
                           torch.full_like(inside, -math.inf, dtype=torch.float64))

    # --------------------------------------------------------------------------------- sampling
    def time_grid(self, steps: int, device=None) -> Tensor:
        """Decoding is one step from the latent (t = 0) to the data (t = 1); ``steps`` is irrelevant."""
        return torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)

    def velocity(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        raise config_error("the latent factor model has no probability-flow ODE",
                           "it generates by decoding a latent, x = g(z) + sigma eps, and its likelihood is the "
                           "latent integral of LatentFactorModel.log_marginal, not an ODE change of variables",
                           "sample with method.sample(net, method.prior_sample(...), steps=1) and evaluate with "
                           "method.log_marginal(net, x, sigma) instead of genflow.likelihood")

    def solve(self, net: Callable, noise: Tensor, *, steps: int = 1, solver: str = "heun", cond: Cond = None,
              guidance: float | None = None, generator: Generators = None, callback=None) -> solvers.Solution:
        """g(z) for padded latents ``noise`` from ``prior_sample`` (one network evaluation); plus sigma eps if
        ``sample_noise``. ``Method.sample`` returns its x."""
        flat = noise.flatten(1)
        x = self.decode(net, flat[:, : self.latent_dim], flat.shape[1]).reshape(noise.shape)
        if self.sample_noise:
            x = x + self.sigma.detach().to(x.dtype) * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback({"i": 0, "t": torch.tensor(1.0, dtype=torch.float64), "x": x})
        return solvers.Solution(x, 1)

    def nfe(self, steps: int, solver: str = "heun") -> int:
        return 1

    def hparams(self) -> dict:
        return {"latent_dim": self.latent_dim, "prior": self.prior, "quadrature_nodes": self.quadrature_nodes,
                "importance_samples": self.importance_samples, "sigma_floor": self.sigma_floor,
                "sample_noise": self.sample_noise}


__all__ = ["LatentFactorModel"]
