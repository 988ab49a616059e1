"""Flow matching on affine Gaussian paths (Lipman et al. 2023; Shaul et al. 2023 for KO paths).

Paper -> code (Shaul et al. numbering; t = 0 noise, t = 1 data, x_t = alpha_t x1 + sigma_t x0):

- Eq. 41 CFM loss || v(x_t, t) - (alpha'_t x1 + sigma'_t x0) ||^2          -> ``FlowMatching.loss``
  (t ~ U[0, 1] or logit-normal; optional sigma_min: sigma_t + sigma_min alpha_t, Lipman et al.'s
  sigma_t = 1 - (1 - sigma_min) t for Cond-OT), weighted per time by ``loss_weight``: ``target_scale``
  multiplies it by w(t) = 2 / (alpha'_t^2 + sigma'_t^2), the mean square of Cond-OT's target over the
  path's own (on normalised data E||alpha'_t x1 + sigma'_t x0||^2 = d (alpha'^2 + sigma'^2)); ``none`` is Eq. 41 as printed; ``path`` (the default) takes the path's
  ``Scheduler.loss_weight``: target_scale for KO, none for the others
- sampling dx/dt = v(x, t) from t = 0 to 1 (Euler / Heun / dopri5 via ``genflow.solvers``)
                                                                          -> ``velocity``, ``time_grid``
- data prediction x1 = (sigma v - sigma' x) / (sigma alpha' - alpha sigma') for DPM-Solver++ in
  lambda = ln(alpha_t / sigma_t)                                          -> ``data_prediction``, ``alpha_sigma``
- instantaneous change of variables needs log p_0 = standard normal       -> ``prior_log_prob``
- scale-time equivalence of affine Gaussian paths (Lipman et al. 2024, "Flow Matching Guide and
  Code", the scheduler change; flow_matching's ScheduleTransformedModel)                              -> ``RetimedFlow``
- Eqs. 7-8 normalised data: with ``normalize=True`` the method works on z = (x - mean) / scale
  (statistics from ``prepare``); every protocol function still speaks data space, so the prior is
  N(mean, scale^2 I) and the velocity is scale * v_z((x - mean) / scale, t).

Why the weight, where the paper trains with uniform t: a weight that depends on t alone leaves the
minimiser unchanged (at every t the regression's minimiser is the marginal field E[target | x_t]; the
weight only trades accuracy between times), and it is exactly 1 on Cond-OT (alpha' = 1, sigma' = -1) and
a constant on cosine. Only KO takes it by default: on VP it up-weights the slow start (alpha'(0) ~ 0.06,
where the target almost vanishes) ~500-fold, that stretch rules the loss instead and VP learns nothing;
capped at 1 it still trains VP's checkerboard less well than Eq. 41 and costs KO ~0.5 FID on digits
(measured, docs/methods.md). It matters where the path's speed varies: a kinetic-optimal path on centred
data starts like alpha_t ~ sqrt(t) (gamma(theta) ~ theta^2 near theta = 0), so E||target||^2 ~ 1/t is not
integrable under uniform t while the marginal velocity stays bounded; the unweighted loss is then ruled
by a few samples at tiny t (on toy2d moons ~20 % of the target's energy on t < 1e-4), Adam's step follows
their noise and 1000 steps learn almost nothing (the "blob"). Weighted, every time contributes a bounded, comparable amount (docs/methods.md has
the measurements).

``path="ko"`` builds an empty ``KineticOptimal`` that ``prepare(datamodule)`` fills from the training
data's lambda-hat (``genflow.cache``: keyed by a hash of the data; ``$GENFLOW_CACHE`` or ~/.cache/genflow).
The table is a buffer, so a checkpoint restores the path without data.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from genflow import solvers
from genflow.cache import cache_dir, cached, content_hash
from genflow.errors import config_error
from genflow.knobs import Knob
from genflow.methods.base import Cond, GaussianMarginal, Generators, Method, randn
from genflow.methods.kinetic import SeparationFunction, estimate_separation, normalize
from genflow.methods.paths import CondOT, KineticOptimal, Scheduler, SchedulerOutput, _ResizingBuffers, make_scheduler

TIME_SAMPLING = ("uniform", "logit_normal")
LOSS_WEIGHTS = ("path", "target_scale", "none")


def cached_separation(z: Tensor, *, queries: int = 1024, max_points: int = 50000, device=None) -> SeparationFunction:
    """lambda-hat of normalised data z, memoised on disk (``genflow.cache``) by a hash of the data and settings."""
    z = z.reshape(z.shape[0], -1).to(torch.float32).contiguous().cpu()
    if z.shape[0] > max_points:
        # a fixed subset (the estimator is quadratic in n; the paper's Fig. 4 shows n = 50K suffices)
        z = z[torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    def compute() -> SeparationFunction:
        return estimate_separation(z, queries=queries, device=device,
                                   generator=torch.Generator(device=device).manual_seed(0))

    def load(path: Path) -> SeparationFunction:
        state = torch.load(path, weights_only=True)
        return SeparationFunction(state["s"], state["lam"])

    path = cache_dir() / f"lambda_{content_hash('separation-v3', z, f'q={queries}')}.pt"
    return cached(path, compute, load=load, save=lambda sep, f: torch.save(sep.state(), f))


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class FlowMatching(_ResizingBuffers, Method):
    """Flow matching over any ``Scheduler`` (an instance or a name: condot | cosine | vp | ko).

    The network predicts the velocity: ``net(x_t, t, cond)`` with t of shape (B,).
    """

    time_name = "t"
    knobs = (Knob("path", str, "condot", "the probability path: conditional OT (Lipman et al. 2023), cosine, VP, or "
                  "kinetic-optimal ko (Shaul et al. 2023): condot | cosine | vp | ko"),)

    def __init__(self, path: Scheduler | str = "condot", *, time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, sigma_min: float = 0.0, normalize: bool = False,
                 ko_queries: int = 1024, ko_max_points: int = 50000, loss_weight: str = "path"):
        super().__init__()
        self.path = make_scheduler(path)
        if time_sampling not in TIME_SAMPLING:
            raise config_error(f"unknown time_sampling {time_sampling!r}", "flow matching draws t from a fixed law",
                               f"use one of {', '.join(TIME_SAMPLING)}")
        if loss_weight not in LOSS_WEIGHTS:
            raise config_error(f"unknown loss_weight {loss_weight!r}", "the flow-matching loss is weighted per time "
                               "by the path's target scale (target_scale), not at all (none), or as the path "
                               "prescribes (path)", f"use one of {', '.join(LOSS_WEIGHTS)}")
        self.loss_weight = self.path.loss_weight if loss_weight == "path" else loss_weight
        if not 0.0 <= sigma_min < 1.0:
            raise config_error(f"sigma_min={sigma_min}", "it is the noise left at t = 1", "use 0 <= sigma_min < 1")
        if logit_std <= 0:
            raise config_error(f"logit_std={logit_std}", "it is a standard deviation", "use a positive value")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, float(logit_mean), float(logit_std)
        self.sigma_min, self.normalize = float(sigma_min), bool(normalize)
        self.ko_queries, self.ko_max_points = int(ko_queries), int(ko_max_points)
        self.register_buffer("shift", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))

    # -- data-dependent setup -------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, datamodule) -> None:
        """Normalisation statistics (``normalize=True``) and, for an unfitted KO path, lambda-hat."""
        needs_ko = isinstance(self.path, KineticOptimal) and not self.path._fitted
        if not (self.normalize or needs_ko):
            return
        x = datamodule.train_tensor()
        if self.normalize:
            z, mean, scale = normalize(x)
            self.shift = mean.to(self.scale.device)
            self.scale = scale.to(self.scale.device)
        else:
            z = x
        if needs_ko:
            sep = cached_separation(z, queries=self.ko_queries, max_points=self.ko_max_points)
            self.path.fit(sep.s, sep.lam)

    def to_normalized(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale

    def from_normalized(self, z: Tensor) -> Tensor:
        return z * self.scale + self.shift

    def clean_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Clean data as the net sees it at the data end t = 1: the normalised frame (x itself unless
        ``normalize=True``) with label 1. A frame of one view of multi-view data takes the views' mean shift."""
        shift = self.shift
        if shift.ndim > x.ndim - 1:
            shift = shift.reshape(-1, *x.shape[1:]).mean(0)
        return (x - shift) / self.scale, torch.ones(x.shape[0], device=x.device, dtype=x.dtype)

    # -- training -------------------------------------------------------------------------------
    def schedule(self, t: Tensor) -> SchedulerOutput:
        """The training path: the scheduler with sigma_min added (sigma_t + sigma_min alpha_t)."""
        out = self.path(t)
        if self.sigma_min > 0:
            out = SchedulerOutput(out.alpha_t, out.sigma_t + self.sigma_min * out.alpha_t, out.d_alpha_t,
                                  out.d_sigma_t + self.sigma_min * out.d_alpha_t)
        return out

    def sample_time(self, n: int, *, device=None, dtype=torch.float32) -> Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device, dtype=dtype)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, dtype=dtype))

    def loss(self, net: Callable, x: Tensor, cond: Cond = None) -> Tensor:
        z1 = self.to_normalized(x)
        t = self.sample_time(x.shape[0], device=x.device, dtype=x.dtype)
        x0 = torch.randn_like(z1)
        sch = self.schedule(t)
        a, s, da, ds = (_per_sample(v, z1) for v in (sch.alpha_t, sch.sigma_t, sch.d_alpha_t, sch.d_sigma_t))
        pred = net(a * z1 + s * x0, t, self.net_cond(cond))
        err = (pred - (da * z1 + ds * x0)).pow(2).flatten(1).sum(1)
        return err if self.loss_weight == "none" else err * self.target_weight(sch)

    @staticmethod
    def target_weight(sch: SchedulerOutput) -> Tensor:
        """w(t) = 2 / (alpha'_t^2 + sigma'_t^2): Cond-OT's target mean square over this path's (1 on Cond-OT)."""
        return 2 / (sch.d_alpha_t ** 2 + sch.d_sigma_t ** 2)

    # -- sampling / likelihood ------------------------------------------------------------------
    def prior_sample(self, shape: Sequence[int], *, generator: Generators = None, device=None) -> Tensor:
        return self.from_normalized(randn(shape, generator=generator, device=device))

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; shift, scale^2 I), (B,) float64 and differentiable in x."""
        scale = self.scale.to(torch.float64)
        z = ((x.to(torch.float64) - self.shift.to(torch.float64)) / scale).flatten(1)
        d = z.shape[1]
        return -0.5 * z.pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi) - d * torch.log(scale)

    def time_grid(self, steps: int, device=None) -> Tensor:
        if steps < 1:
            raise config_error(f"steps={steps}", "a sampler needs at least one step", "use steps >= 1")
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)

    def velocity(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.scale * net(self.to_normalized(x), t, self.net_cond(cond))

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) of the training path (sigma_min included), float64. In data space
        x_t - shift = alpha_t (x - shift) + sigma_t scale eps; the scale drops out of every ratio an
        exponential integrator takes, and ``combine`` works around the shift."""
        out = self.schedule(torch.as_tensor(t, dtype=torch.float64, device=self.scale.device))
        return out.alpha_t, out.sigma_t

    def data_prediction(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """x1 from the velocity: with x_t = alpha x1 + sigma x0 and v = alpha' x1 + sigma' x0 (around the data
        mean ``shift`` in data space), x1 = (sigma v - sigma' x_t) / (sigma alpha' - alpha sigma') (positive
        denominator on every path)."""
        v = self.velocity(net, x, t, cond).to(x.dtype)
        sch = self.schedule(torch.as_tensor(t, device=x.device, dtype=torch.float64))
        det = sch.sigma_t * sch.d_alpha_t - sch.alpha_t * sch.d_sigma_t
        shift = self.shift.to(x.dtype)
        return shift + (sch.sigma_t / det).to(x.dtype) * v - (sch.d_sigma_t / det).to(x.dtype) * (x - shift)

    def solver_options(self, solver: str) -> dict:
        """The exponential integrators step on EDM's rho-spacing of sigma/alpha: the uniform t grid wastes its
        first and last steps where lambda runs to -inf/+inf (digits, NFE 10, Cond-OT: dpmpp_2m FID 3.69 against
        3.78 uniform in log-SNR and 4.00 uniform in t, unipc 3.56 against 3.63 and 3.61; KO: 2.97 / 3.06 /
        7.04 and 2.82 / 2.96 / 6.56)."""
        return {"schedule": "karras"} if solver in solvers.EXPONENTIAL_SOLVERS else {}

    def combine(self, *pairs: tuple[Tensor, Tensor]) -> Tensor:
        """shift + sum_i c_i (x_i - shift): the path is affine around the data mean ``shift``."""
        shift = self.shift.to(pairs[0][0].dtype)
        return shift + super().combine(*((x - shift, c) for x, c in pairs))

    def gaussian_marginal(self) -> GaussianMarginal | None:
        """In data space x_t = alpha_t x + (1 - alpha_t) shift + scale sigma_t eps (``normalize=True`` works
        on z = (x - shift)/scale; sigma_min is in ``schedule``); data at t = 1. None with a per-dimension
        scale (anisotropic noise in data space)."""
        scale = self.scale.to(torch.float64)
        if scale.numel() > 1 and not bool((scale == scale.flatten()[0]).all()):
            return None
        c = float(scale.flatten()[0])

        def coeffs(t: float) -> tuple[float, float]:
            out = self.schedule(torch.tensor(t, dtype=torch.float64))
            return float(out.alpha_t), c * float(out.sigma_t)

        closed = None
        if isinstance(self.path, CondOT) and self.sigma_min == 0.0:
            closed = lambda s: c / (c + s)  # alpha = t, sigma = c (1 - t): delta = s / (c + s)
        return GaussianMarginal(f"FlowMatching/{self.path.name}", alpha=lambda t: coeffs(t)[0],
                                sigma=lambda t: coeffs(t)[1], t_data=1.0, t_prior=0.0, t_clean=1.0,
                                closed_form=closed, shift=self.shift)

    def describe(self) -> dict:
        return {"method": "flow", "path": self.path.name}

    def retimed(self, path: Scheduler | str) -> "RetimedFlow":
        """This trained model sampled along another path, without retraining (the scale-time equivalence)."""
        return RetimedFlow(self, make_scheduler(path))

    def hparams(self) -> dict:
        return {"path": self.path.name, "time_sampling": self.time_sampling, "loss_weight": self.loss_weight,
                "sigma_min": self.sigma_min, "normalize": self.normalize}


def retime_velocity(v_source: Callable[[Tensor, Tensor], Tensor], source: Scheduler, target: Scheduler,
                    x: Tensor, r: Tensor) -> Tensor:
    """Velocity in ``target``'s time r from a velocity field v_source(x, t) trained on ``source``.

    Both paths share the coupling, so x^target_r = k_r x^source_{t_r} with the same angle
    theta = atan2(alpha, sigma) (i.e. the same SNR) and k_r = |(alpha, sigma)_target| / |(alpha, sigma)_source|.
    Then dx/dr = k' x_t + k t' v_source(x_t, t_r) with t' = theta'_target / theta'_source. Using the angle
    and radius instead of SNR and sigma keeps every term finite at t = 0 and t = 1.
    """
    r = r.to(torch.float64)
    tg = target(r)
    theta = torch.atan2(tg.alpha_t, tg.sigma_t)
    t = source.theta_inverse(theta)
    sc = source(t)

    def polar(o: SchedulerOutput):
        rad2 = o.alpha_t ** 2 + o.sigma_t ** 2
        rad = rad2.sqrt()
        return rad, (o.alpha_t * o.d_alpha_t + o.sigma_t * o.d_sigma_t) / rad, \
            (o.d_alpha_t * o.sigma_t - o.alpha_t * o.d_sigma_t) / rad2

    rad_t, drad_t, dth_t = polar(tg)
    rad_s, drad_s, dth_s = polar(sc)
    dt = dth_t / dth_s
    k = rad_t / rad_s
    dk = (drad_t - k * drad_s * dt) / rad_s
    k_, dk_, dt_ = (_per_sample(v.to(x.dtype), x) for v in (k, dk, dt))
    xs = x / k_
    return dk_ * xs + k_ * dt_ * v_source(xs, t.to(x.dtype))


class RetimedFlow(Method):
    """A trained ``FlowMatching`` model sampled on another scheduler (e.g. trained Cond-OT, sampled KO)."""

    time_name = "t"

    def __init__(self, base: FlowMatching, path: Scheduler):
        super().__init__()
        self.base, self.path = base, path

    def loss(self, net, x, cond=None):
        raise config_error("a re-timed flow cannot be trained", "it reuses a velocity field trained on another path",
                           "train the base FlowMatching model and call .retimed(path) for sampling")

    def prior_sample(self, shape, *, generator=None, device=None):
        return self.base.prior_sample(shape, generator=generator, device=device)

    def prior_log_prob(self, x):
        return self.base.prior_log_prob(x)

    def time_grid(self, steps, device=None):
        return self.base.time_grid(steps, device=device)

    def velocity(self, net, x, t, cond=None):
        b = self.base
        r = torch.as_tensor(t, device=x.device)
        r = r.expand(x.shape[0]) if r.ndim == 0 else r

        cond = b.net_cond(cond)

        def v_source(z, tt):
            return net(z, tt, cond)

        return b.scale * retime_velocity(v_source, b.path, self.path, b.to_normalized(x), r)

    def clean_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.clean_view(x)

    def solvers(self) -> tuple[str, ...]:
        """ODE integrators only: the re-timed velocity is not the data prediction of a path it was trained on."""
        return solvers.ODE_SOLVERS

    def describe(self) -> dict:
        return {"method": "flow", "path": self.path.name, "trained_on": self.base.path.name}

    def hparams(self) -> dict:
        return {"trained_on": self.base.path.name, "sampled_on": self.path.name}
