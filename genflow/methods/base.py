"""The Method protocol: what every generative method (EDM, PFGM++, SPD, flow matching, ...) offers.

A Method knows tensors and a ``net`` callable, never Lightning, loaders or files. Schedule tables
and spectra are registered as buffers so they move with ``.to()`` and live in checkpoints.

The network contract shared by every backbone: ``net(x, noise_label, cond)`` with x of the data
shape (B, ...), ``noise_label`` of shape (B,) (whatever scalar the method feeds: EDM's ln(sigma)/4,
flow time t, ...) and ``cond`` an optional dict ({"class": one-hot (B, K), "camera": ..., ...})
passed through untouched. Its output has x's shape. The *null condition* used by classifier-free
guidance is the same dict with every tensor zeroed (``null_cond``), the convention of EDM and of
Isotropic3D's zero image embedding.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from genflow import solvers
from genflow.errors import config_error

Cond = Mapping[str, Tensor] | None
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], *, generator: Generators = None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise drawn on ``device``.

    ``generator`` may be one ``torch.Generator`` or one per sample (a sequence of length shape[0]);
    per-sample generators make image i identical whatever the batch it is drawn in.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def null_cond(cond: Cond) -> Cond:
    """The unconditional branch for classifier-free guidance: every conditioning tensor zeroed.

    Geometry inputs are not conditions to guide on: a reference view (keys starting with
    "reference") and the cameras are left out here and kept unchanged in both branches by ``guided``,
    as in MVDream/Isotropic3D's released sampler.
    """
    if cond is None:
        return None
    return {k: torch.zeros_like(v) for k, v in cond.items() if not k.startswith(KEPT_IN_UNCOND)}


#: conditioning keys that are inputs rather than guidance targets (kept in the unconditional branch)
KEPT_IN_UNCOND = ("reference", "camera")
#: conditioning entries that are clean data frames shown beside the noisy input (Isotropic3D's reference
#: view); ``Method.net_cond`` feeds them as the running method feeds clean data
CLEAN_FRAMES = ("reference",)


def guided(net: Callable, guidance: float | None) -> Callable:
    """Wrap ``net`` for classifier-free guidance: out = uncond + w * (cond - uncond).

    w = 1 (or None) is the plain conditional model. Every method's velocity is affine in the net
    output, so mixing net outputs equals mixing denoisers/velocities. Both branches run in one batch.
    """
    if guidance is None or guidance == 1.0:
        return net

    def guided_net(x: Tensor, noise_label: Tensor, cond: Cond = None) -> Tensor:
        if not cond:
            raise ValueError("guidance needs a conditional model and a condition (cond is empty)")
        uncond = null_cond(cond)
        both = {k: torch.cat([v, uncond.get(k, v)]) for k, v in cond.items()}
        out = net(torch.cat([x, x]), torch.cat([noise_label, noise_label]), both)
        out_c, out_u = out.chunk(2)
        return out_u + guidance * (out_c - out_u)

    return guided_net


class Autoguided(nn.Module):
    """Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", 2024, eq. 1):
    D_w = D_guide + w (D_net - D_guide), where ``guide`` is a weaker network of the same method (smaller,
    or trained for fewer steps).

    The mix is taken of the raw network outputs. Every method's prediction (EDM/PFGM++ denoiser, flow-matching
    velocity, DDPM/SPD noise prediction) is affine in the net output with coefficients that do not depend on
    the net, and the two weights 1 - w and w sum to one, so mixing net outputs is mixing the method's
    predictions as the paper defines; no method is asked which it is. Both networks see the same input, noise
    label and condition. An ``nn.Module``, so ``eval()``, ``to()`` and ``parameters()`` reach both networks.
    """

    def __init__(self, net: nn.Module, guide: nn.Module, weight: float):
        super().__init__()
        self.net, self.guide, self.weight = net, guide, float(weight)

    def forward(self, x: Tensor, noise_label: Tensor, cond: Cond = None) -> Tensor:
        good = self.net(x, noise_label, cond)
        bad = self.guide(x, noise_label, cond)
        return bad + self.weight * (good - bad)


def autoguided(net: nn.Module, guide: nn.Module | None, weight: float | None) -> nn.Module:
    """``net`` guided by ``guide`` with weight ``weight`` (``Autoguided``); ``net`` itself, untouched, when there
    is no guide or w = 1 (exactly the good model, and the guide is never run)."""
    if guide is None or weight is None or float(weight) == 1.0:
        return net
    return Autoguided(net, guide, weight)


@dataclass
class GaussianMarginal:
    """A Gaussian perturbation path: x_t = alpha(t) x + (1 - alpha(t)) shift + sigma(t) eps, eps ~ N(0, I).

    ``t_data``/``t_prior`` are the ends of the ODE; ``t_clean`` is where the clean likelihood starts (EDM:
    sigma_min, its ODE is singular at sigma = 0). The likelihood's sigma0 mapping solves rho(t0) = sigma0
    with rho = sigma/alpha (``closed_form`` where known, else bisection). ``shift`` is a normalising
    flow's data mean.
    """

    name: str
    alpha: Callable[[float], float]
    sigma: Callable[[float], float]
    t_data: float
    t_prior: float
    t_clean: float
    closed_form: Callable[[float], float] | None = None
    shift: Tensor | float = 0.0

    def rho(self, t: float) -> float:
        a = self.alpha(t)
        return self.sigma(t) / a if a > 0 else math.inf

    def time_for(self, sigma0: float) -> float:
        """t0 with rho(t0) = sigma0 (closed form where known, else bisection; rho is monotone)."""
        lo_rho, hi_rho = self.rho(self.t_data), self.rho(self.t_prior)
        if sigma0 < lo_rho * (1 - 1e-9):
            raise config_error(
                f"sigma0={sigma0} is below this path's smallest noise level {lo_rho:g} ({self.name})",
                "the model's density at its data end is already the data perturbed by that much noise; "
                "a smaller perturbation is not contained in the path",
                f"use sigma0 >= {lo_rho:g}, or a model trained with a smaller sigma_min")
        if sigma0 > hi_rho:
            raise config_error(f"sigma0={sigma0} exceeds the path's largest noise level {hi_rho:g} ({self.name})",
                               "there is no time on the path with that much noise",
                               "use a smaller sigma0 (typical: 0.01-0.1 for data in [-1, 1])")
        if sigma0 <= lo_rho:
            return self.t_data
        if self.closed_form is not None:
            return self.closed_form(sigma0)
        a, b = self.t_data, self.t_prior
        for _ in range(200):  # rho increases from t_data to t_prior, whichever way time runs
            m = 0.5 * (a + b)
            if self.rho(m) < sigma0:
                a = m
            else:
                b = m
        return 0.5 * (a + b)


class Method(nn.Module, ABC):
    """Base class of all generative methods; see the module docstring for the net contract.

    Times: EDM/PFGM++ use sigma (decreasing to 0), flow matching t in [0, 1] (noise -> data),
    SPD s in [1, 0]. Samplers (``genflow.solvers``) integrate ``velocity`` along whatever ``time_grid``
    returns, or run a method's own chain.

    Everything the rest of genflow needs from a method is here, so nothing outside ``genflow.methods``
    asks which method it runs: training (``loss``, ``prepare``), sampling (``prior_sample``,
    ``time_grid``, ``velocity``, ``solvers``, ``sample``/``solve``, ``nfe``), conditioning frames
    (``clean_view``), likelihoods (``prior_log_prob``, ``likelihood_interval``, ``gaussian_marginal``)
    and reports (``describe``).
    """

    #: human-readable time variable name (for plots and docs)
    time_name: str = "t"
    #: the name rows and JSON lines report (``describe``)
    display_name: str = ""

    @abstractmethod
    def loss(self, net: Callable, x: Tensor, cond: Cond = None) -> Tensor:
        """Per-sample training loss, shape (B,), already weighted (summed over data dimensions)."""
        ...

    def prepare(self, datamodule) -> None:
        """Data-dependent setup before training (spectra, normalisation, separation functions); a
        checkpoint restores what it computes. Most methods need none."""

    @abstractmethod
    def prior_sample(self, shape: Sequence[int], *, generator: Generators = None, device=None) -> Tensor:
        """Draw from the prior at the noise end of the time grid."""
        ...

    @abstractmethod
    def prior_log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the prior, shape (B,), differentiable in x (likelihood training)."""
        ...

    @abstractmethod
    def time_grid(self, steps: int, device=None) -> Tensor:
        """float64 grid of ``steps + 1`` times from the prior end to the data end."""
        ...

    @abstractmethod
    def velocity(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """ODE drift dx/dt in this method's time; t is a scalar tensor or shape (B,)."""
        ...

    # ---------------------------------------------------------------------------- likelihood
    def likelihood_interval(self) -> tuple[float, float]:
        """(t_data, t_prior): where the clean likelihood's ODE starts and ends (default: the grid's ends)."""
        grid = self.time_grid(1)
        return float(grid[-1]), float(grid[0])

    def gaussian_marginal(self) -> GaussianMarginal | None:
        """The path's Gaussian perturbation (alpha(t), sigma(t)) for the sigma0-perturbed likelihood, or
        None where the perturbation is not N(alpha x, sigma^2 I) at any time (heavy tails, coloured noise)."""
        return None

    # --------------------------------------------------------------------- conditioning frames
    def clean_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """How the net sees clean data x (B, ...): (net input, noise label (B,)) at the data end of this
        method's path. Conditioning frames (``CLEAN_FRAMES``) are fed this way, so a reference view looks
        to the net like a target that has reached the end of sampling."""
        raise config_error(f"{type(self).__name__} has no clean view",
                           "it has no noise label at the data end to show a clean conditioning frame with",
                           "use a diffusion or flow method (edm, pfgmpp, ddpm, spd, flow) with reference views")

    def net_cond(self, cond: Cond) -> Cond:
        """``cond`` as the net receives it: every clean frame (``CLEAN_FRAMES``) replaced by its clean view,
        with its noise label added as ``<key>_noise_label`` (B,)."""
        if not cond or not any(k in cond for k in CLEAN_FRAMES):
            return cond
        out = dict(cond)
        for key in CLEAN_FRAMES:
            if key in cond:
                out[key], out[f"{key}_noise_label"] = self.clean_view(cond[key])
        return out

    # ------------------------------------------------------------- exponential integrators
    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) of the path x_t = alpha x_data + sigma eps, float64, of shape ``t.shape`` plus,
        for a per-coefficient path, the shape of ``combine``'s coefficients (SPD: per frequency). Exponential integrators
        (``dpmpp_2m``, ``unipc``) step
        in lambda = ln(alpha / sigma), which is -inf where alpha = 0 and +inf where sigma = 0."""
        raise config_error(f"{type(self).__name__} has no Gaussian path x_t = alpha x + sigma eps",
                           "exponential integrators (dpmpp_2m, unipc) step along log(alpha/sigma) of such a path",
                           f"use one of {', '.join(solvers.ODE_SOLVERS)}")

    def data_prediction(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The net's estimate of the clean data E[x_data | x_t = x] at time ``t`` (scalar), in x's dtype."""
        raise config_error(f"{type(self).__name__} has no data prediction",
                           "exponential integrators (dpmpp_2m, unipc) step on the predicted clean data",
                           f"use one of {', '.join(solvers.ODE_SOLVERS)}")

    def combine(self, *pairs: tuple[Tensor, Tensor]) -> Tensor:
        """sum_i c_i x_i for (x_i, c_i) pairs with coefficients shaped like ``alpha_sigma``'s; the basis in
        which the path is diagonal (SPD: Fourier) and its centre (a normalised flow's data mean) are the
        method's business. Default: scalar coefficients, centre 0."""
        out = pairs[0][1].to(pairs[0][0].dtype) * pairs[0][0]
        for x, c in pairs[1:]:
            out = out + c.to(x.dtype) * x
        return out

    # -------------------------------------------------------------------------------- sampling
    def solvers(self) -> tuple[str, ...]:
        """Names of the samplers (``genflow.solvers.SAMPLERS``) this method offers: the ODE integrators of
        ``velocity`` and the exponential integrators of ``data_prediction`` along ``alpha_sigma``."""
        return (*solvers.ODE_SOLVERS, *solvers.EXPONENTIAL_SOLVERS)

    def solver_options(self, solver: str) -> dict:
        """Per-method sampler options (e.g. EDM's Heun skips the correction on the step to sigma = 0)."""
        return {}

    def check_solver(self, solver: str, key: str = "solver", options: Mapping | None = None) -> str:
        """``solver`` if this method offers it and it takes every one of ``options`` (a user's sampler
        settings, e.g. {"S_churn": 40}), else a ConfigError naming the setting ``key``."""
        if solver not in self.solvers():
            raise config_error(f"{key}={solver!r} is not a sampler of {type(self).__name__}",
                               f"{type(self).__name__} samples with {', '.join(self.solvers())}",
                               f"use {key}={'heun' if 'heun' in self.solvers() else self.solvers()[0]} "
                               f"(or one of {', '.join(self.solvers())})")
        unused = sorted(set(options or ()) - set(solvers.get(solver).options))
        if unused:
            takers = [s for s in self.solvers() if set(unused) <= set(solvers.get(s).options)]
            raise config_error(f"{', '.join(unused)} given for {key}={solver}",
                               f"the {solver} sampler of {type(self).__name__} does not use "
                               f"{'it' if len(unused) == 1 else 'them'}; "
                               f"{'it' if len(unused) == 1 else 'they'} would be silently ignored",
                               f"use {key}={takers[0]}, which takes {'it' if len(unused) == 1 else 'them'}" if takers
                               else f"drop {', '.join(unused)}")
        return solver

    def solve(self, net: Callable, noise: Tensor, *, steps: int, solver: str = "heun", cond: Cond = None,
              guidance: float | None = None, generator: Generators = None, callback=None, **options) -> "solvers.Solution":
        """Run sampler ``solver`` from ``noise`` (a prior draw) to data; returns x and the NFE.

        ``generator`` (one per sample) drives any sampler noise; ``options`` override ``solver_options``."""
        self.check_solver(solver, options=options)
        return solvers.get(solver).run(self, guided(net, guidance), noise, steps=steps, cond=cond,
                                       generator=generator, callback=callback,
                                       **{**self.solver_options(solver), **options})

    def sample(self, net: Callable, noise: Tensor, *, steps: int, solver: str = "heun", cond: Cond = None,
               guidance: float | None = None, generator: Generators = None, callback=None, **options) -> Tensor:
        """``solve(...).x``: samples from ``noise``."""
        return self.solve(net, noise, steps=steps, solver=solver, cond=cond, guidance=guidance,
                          generator=generator, callback=callback, **options).x

    def nfe(self, steps: int, solver: str = "heun") -> int | None:
        """Network evaluations of ``sample`` with this many steps; None for adaptive solvers (measured:
        ``solve(...).nfe``)."""
        self.check_solver(solver)
        return solvers.get(solver).nfe(steps, **self.solver_options(solver))

    # --------------------------------------------------------------------------------- reports
    def describe(self) -> dict:
        """The settings a result row reports, starting with the method's name (e.g. {"method": "PFGM++",
        "D": 128}); ``hparams`` has them all."""
        return {"method": self.display_name or type(self).__name__}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams().items())

    def hparams(self) -> dict:
        return {}
