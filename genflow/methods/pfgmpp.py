"""PFGM++: Xu, Liu, Tian, Tong, Tegmark, Jaakkola, "PFGM++: Unlocking the Potential of
Physics-Inspired Generative Models" (ICML 2023), on EDM's preconditioning and sampler.

Data x in R^N is augmented with D extra dimensions of radius r; the electric field of the data in
R^(N+D) gives the ODE dx/dr = (x - E[y | x])/r. With the alignment r = sigma sqrt(D) (paper Sec. 4)
this is EDM's ODE dx/dsigma = (x - D(x; sigma))/sigma, so D enters only through the perturbation
kernel (training) and the prior (sampling). Paper equation -> function:

- Kernel p_r(x | y) ∝ (||x - y||^2 + r^2)^(-(N+D)/2), r = sigma sqrt(D)     -> ``PFGMPP.perturb``
  Its radial law is R^2/r^2 ~ BetaPrime(N/2, D/2). We draw it as a scaled multivariate t with D
  degrees of freedom: n = sigma g sqrt(D / chi2_D), g ~ N(0, I_N), chi2_D = 2 Gamma(D/2), because
  ||n||^2/r^2 = chi2_N / chi2_D = Gamma(N/2)/Gamma(D/2) ~ BetaPrime(N/2, D/2) and g/||g|| is uniform
  and independent of both. No Beta draw, so no 1 - t cancellation and no clipping at any N, D
  (the reference code clips t to [1e-3, 1 - 1e-3], which truncates half the draws at N = 3072,
  D = 3072000).                                                           -> ``PFGMPP._kernel_scale``
- E||n||^2 = N sigma^2 D/(D-2): finite only for D > 2 (D <= 2 needs ``allow_heavy_tails=True``).
- Prior (Algorithm 4): the kernel at r_max = sigma_max sqrt(D) around the origin, with the same
  sigma_max as the time grid                                              -> ``prior_sample``
- Prior density: multivariate t, D dof, scale sigma_max                   -> ``prior_log_prob``
- Preconditioning, loss weight, log-normal sigma, Karras grid, Heun: EDM's, indexed by sigma
  ("hyper-parameter transfer"); the network never sees r. c_in stays EDM's 1/sqrt(sigma^2+sd^2) as in
  the paper's code; ``correct_c_in=True`` uses the kernel's true variance sigma^2 D/(D-2) instead.
- D = None or inf is EDM: the hooks fall back to the Gaussian and the whole code path is EDM's.

Per-sample generators (``base.randn``) also drive the Gamma draw of the prior: torch's Gamma sampler
takes no generator, so ``sample_gamma`` implements Marsaglia & Tsang (2000) with explicit generators.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from genflow.errors import config_error
from genflow.knobs import Knob
from genflow.methods.base import Generators
from genflow.methods.edm import EDM

#: candidates drawn per sample before falling back to a loop; Marsaglia-Tsang accepts >= 95% of them
_GAMMA_BLOCK = 8


def _mt_candidates(alpha: float, z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Marsaglia-Tsang proposals d v for Gamma(alpha >= 1) and their acceptance mask."""
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    v = (1.0 + c * z) ** 3
    ok = v > 0
    logv = torch.where(ok, v, torch.ones_like(v)).log()
    ok &= u.log() < 0.5 * z ** 2 + d - d * v + d * logv
    return d * v, ok


def sample_gamma(concentration: float, batch: int, *, generator: Generators = None, device=None,
                 block: int = _GAMMA_BLOCK) -> Tensor:
    """(batch,) float64 draws from Gamma(concentration, 1), exact in distribution.

    ``generator`` None uses torch's own sampler (fast, for training). A torch.Generator or a list of
    per-sample generators uses Marsaglia-Tsang with those generators, so that sample i depends only on
    generator i (batch-invariant). Concentration < 1 uses Gamma(a) = Gamma(a + 1) U^(1/a).
    """
    if not concentration > 0 or not math.isfinite(concentration):
        raise ValueError(f"Gamma concentration must be positive and finite, got {concentration}")
    if generator is None:
        conc = torch.full((batch,), float(concentration), dtype=torch.float64, device=device)
        return torch.distributions.Gamma(conc, torch.ones_like(conc), validate_args=False).sample()
    alpha = concentration + 1.0 if concentration < 1 else float(concentration)
    per_sample = not isinstance(generator, torch.Generator)
    if per_sample and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}")

    def draw(gen, shape):
        z = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
        u = torch.rand(shape, generator=gen, device=device, dtype=torch.float64)
        return z, u

    if per_sample:
        zu = [draw(g, (block,)) for g in generator]
        z, u = torch.stack([a for a, _ in zu]), torch.stack([b for _, b in zu])
    else:
        z, u = draw(generator, (batch, block))
    cand, ok = _mt_candidates(alpha, z, u)
    first = ok.to(torch.int8).argmax(1, keepdim=True)  # index of the first accepted proposal
    out = cand.gather(1, first).squeeze(1)
    missing = ~ok.any(1)
    # rare (< 0.05^block per sample): continue each unfinished sample's own proposal stream
    if bool(missing.any()):
        for i in missing.nonzero().flatten().tolist():
            gen = generator[i] if per_sample else generator
            while True:
                c1, ok1 = _mt_candidates(alpha, *draw(gen, (block,)))
                if bool(ok1.any()):
                    out[i] = c1[ok1.to(torch.int8).argmax()]
                    break
    if concentration < 1:
        if per_sample:
            extra = torch.stack([torch.rand((), generator=g, device=device, dtype=torch.float64) for g in generator])
        else:
            extra = torch.rand((batch,), generator=generator, device=device, dtype=torch.float64)
        out = out * extra ** (1.0 / concentration)
    return out


MAX_FINITE_D = 1e12


def _parse_D(D) -> float:
    if D is None:
        return math.inf
    if isinstance(D, str) and D.strip().lower() in ("inf", "infinity", "none", "null"):
        return math.inf
    try:
        if isinstance(D, bool):
            raise TypeError
        value = float(D)
    except (TypeError, ValueError):
        raise config_error(f"D={D!r} is not a number",
                           "D is the number of augmented dimensions of PFGM++",
                           "pass a number such as D=128, or D=inf / D=null for EDM") from None
    if math.isnan(value) or value <= 0:
        raise config_error(f"D={D!r} is not positive",
                           "D counts augmented dimensions; the kernel has D degrees of freedom",
                           "pass D > 2 (the paper uses 64, 128, 2048), or D=inf for EDM")
    if math.isfinite(value) and value > MAX_FINITE_D:
        raise config_error(f"D={value:g} is beyond {MAX_FINITE_D:g}",
                           "PFGM++ differs from EDM (D = inf) by O(1/D), below float32 rounding (the network's "
                           "precision) from D ~ 1e8 on; a larger finite D only risks overflow in D^2 and D-degree "
                           "Beta draws", "use D=inf (EDM), or a D up to 1e12")
    return value


class PFGMPP(EDM):
    """PFGM++ with D augmented dimensions on EDM's preconditioning and Heun sampler; D = None/inf is EDM."""

    knobs = (Knob("D", float, 128, "augmented dimensions of PFGM++ (Xu et al. 2023, Section 3); inf gives EDM",
                  lo=0, lo_open=True),)

    def __init__(self, D: float | None = 128, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 allow_heavy_tails: bool = False, correct_c_in: bool = False, S_churn: float = 0.0,
                 S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0):
        super().__init__(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, P_mean=P_mean, P_std=P_std,
                         sigma_data=sigma_data, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
        self.D = _parse_D(D)
        self.allow_heavy_tails = bool(allow_heavy_tails)
        self.correct_c_in = bool(correct_c_in)
        if self.D <= 2 and not self.allow_heavy_tails:
            raise config_error(
                f"PFGM++ with D={D} has a perturbation kernel with infinite second moment",
                "E||n||^2 = N sigma^2 D/(D-2) diverges for D <= 2: noise norms are heavy-tailed, so EDM's "
                "preconditioning (which assumes variance sigma^2) and the loss weighting no longer match the "
                "noise, and single draws can be arbitrarily far out",
                "use D > 2 (the paper uses 64, 128, 2048; D=inf is EDM), or pass allow_heavy_tails=True "
                "(model.allow_heavy_tails=true) if you want this regime on purpose")
        if self.correct_c_in and self.D <= 2:
            raise config_error(f"correct_c_in=True with D={D}",
                               "the corrected c_in uses the kernel variance sigma^2 D/(D-2), infinite for D <= 2",
                               "use correct_c_in=False or D > 2")

    @property
    def gaussian(self) -> bool:
        return math.isinf(self.D)

    @property
    def r_max(self) -> float:
        """Prior radius r_max = sigma_max sqrt(D) (the aligned r at the top of the time grid)."""
        return self.sigma_max * math.sqrt(self.D)

    def _kernel_scale(self, sigma: Tensor, generator: Generators) -> Tensor:
        if self.gaussian:
            return super()._kernel_scale(sigma, generator)
        chi2 = 2.0 * sample_gamma(self.D / 2.0, sigma.shape[0], generator=generator, device=sigma.device)
        # float64 for the D/chi2 ratio: at D = 3e6 it is 1 +- 1e-3 and float32 would round its spread
        return (sigma.to(torch.float64) * (self.D / chi2).sqrt()).to(sigma.dtype)

    def _log_kernel(self, sqnorm: Tensor, n: int, sigma: float) -> Tensor:
        if self.gaussian:
            return super()._log_kernel(sqnorm, n, sigma)
        D = self.D
        const = (math.lgamma((D + n) / 2) - math.lgamma(D / 2) - 0.5 * n * math.log(D * math.pi)
                 - n * math.log(sigma))
        return const - 0.5 * (D + n) * torch.log1p(sqnorm / (D * sigma ** 2))

    def _input_variance(self, sigma: Tensor) -> Tensor:
        if self.correct_c_in and not self.gaussian:
            return sigma ** 2 * (self.D / (self.D - 2))
        return super()._input_variance(sigma)

    def solvers(self) -> tuple[str, ...]:
        """EDM's, but the stochastic sampler only for D = inf: its churn adds Gaussian noise, which is not
        this kernel's perturbation for finite D."""
        return super().solvers() if self.gaussian else tuple(s for s in super().solvers() if s != "stochastic")

    def gaussian_marginal(self):
        """EDM's for D = inf; None for finite D: the kernel is a heavy-tailed multivariate t, so no time
        on the path holds the data law convolved with N(0, sigma0^2 I)."""
        return super().gaussian_marginal() if self.gaussian else None

    def describe(self) -> dict:
        D = self.D
        return {"method": "PFGM++", "D": "inf" if math.isinf(D) else (int(D) if float(D).is_integer() else D)}

    def hparams(self) -> dict:
        return {"D": self.D, **super().hparams(), "allow_heavy_tails": self.allow_heavy_tails,
                "correct_c_in": self.correct_c_in}


__all__ = ["PFGMPP", "sample_gamma"]
