"""Probability-flow ODE likelihoods, noise-perturbed likelihoods and bits/dim for every genflow method.

Instantaneous change of variables (Chen et al. 2018; Song et al. 2021): along dx/dt = v(x, t),
d log p_t(x(t))/dt = -div v, so with the data end t_a and the prior end t_b

    log p_{t_a}(x(t_a)) = log p_prior(x(t_b)) + int_{t_a}^{t_b} div v(x(t), t) dt.

``log_likelihood`` integrates the augmented state (x, Delta) with dDelta/dt = div v from t_a to t_b with
torchdiffeq (the method's own time variable, increasing or decreasing). The divergence is exact (one
backward pass per dimension, for small dimensions) or Hutchinson-Skilling's v^T (dv/dx) v with the probe
drawn once and held fixed for the whole solve (resampling per step breaks the adaptive solver).

Noise-perturbed likelihood (Chae, Kim, Kim & Lin, JMLR 2023): for data declared continuous or singular
(on a manifold) the clean likelihood is ill-posed; we report log q_{sigma0}(y), the density of the data
law convolved with N(0, sigma0^2 I), at y = x + sigma0 eps. Every Gaussian path already contains that
law: if the method's marginal is x_t = alpha_t x_data + sigma_t eps, then with rho(t) = sigma_t/alpha_t

    log q_{sigma0}(y) = log p_{t0}(alpha_{t0} y) + D log alpha_{t0},   rho(t0) = sigma0.

VE/EDM: alpha = 1, t0 = sigma0. VP: sigma_t/alpha_t = sigma0. Cond-OT flow (alpha = t, sigma = 1 - t):
t0 = 1/(1 + sigma0), i.e. delta = 1 - t0 = sigma0/(1 + sigma0). PFGM++ with finite D (heavy-tailed
kernel) and SPD (coloured noise) have no such time and get a clear error.

Bits/dim of 8-bit data with uniform dequantization y = lo + s (x_int + u)/2^bits, s = hi - lo, and K
importance samples: log P(x_int) >= log (1/K) sum_k p(y_k) + D log s - D bits log 2, so
bpd = -(LSE_k log p(y_k) - log K)/(D ln 2) - log2 s + bits  (+7 for [-1, 1] data, +8 for [0, 1]).
No truncation residual (Gaussian decoder / entropy term) is added: for EDM the clean likelihood starts at
sigma_min with the (dequantized) data as x(sigma_min), as score_sde does at t = eps.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from genflow.errors import ConfigError, config_error
from genflow.methods.base import GaussianMarginal

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4")


# ------------------------------------------------------------------------------------ instance noise
def instance_noise_schedule(n: int, c: float = 0.5, gamma: float = 1 / 3) -> float:
    """sigma~(n) = c n^(-gamma): how much instance noise to add to n training points.

    Assumption (unverified against the paper): a sieve MLE balancing the bias ~sigma against the
    estimation error (n sigma^(d/beta))^(-beta/(2 beta + d)) gives gamma = beta/(2(beta + d)); beta = 2
    (smooth generator), d = 1 (a curve) gives the default 1/3. c sets the scale (pilot: 0.05 at n = 1000
    for the unit circle, i.e. c = 0.5).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise config_error(f"n={n!r} is not a positive integer", "n is the number of training points",
                           "pass the training-set size")
    if not c > 0 or not gamma > 0:
        raise config_error(f"c={c}, gamma={gamma}", "the schedule c n^-gamma must be positive and decreasing",
                           "use c > 0 and gamma > 0 (theory: gamma = beta/(2(beta+d)), 1/3 for beta=2, d=1)")
    return float(c) * float(n) ** (-float(gamma))


def add_instance_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """x + sigma eps with fresh eps ~ N(0, I) drawn on x's device; sigma = 0 returns x itself."""
    if not sigma >= 0:
        raise config_error(f"instance noise sigma={sigma}", "it is a standard deviation",
                           "use 0 (off) or a positive value such as 0.05")
    if sigma == 0:
        return x
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------- Gaussian kernels
def gaussian_kernel(method) -> GaussianMarginal:
    """The method's Gaussian perturbation path (the sigma0 <-> t0 map), or a clear error where it has none."""
    kernel = method.gaussian_marginal()
    if kernel is None:
        described = ", ".join(f"{k}={v}" for k, v in method.describe().items() if k != "method")
        raise config_error(
            f"sigma0-perturbed likelihood requested for {method.describe()['method']}"
            + (f" ({described})" if described else ""),
            "its perturbation is not N(alpha x, sigma^2 I) at any time (heavy-tailed kernel such as PFGM++ with "
            "finite D, coloured noise such as SPD, or an anisotropic normalisation), so no time on the path "
            "holds the data law convolved with white N(0, sigma0^2 I)",
            "evaluate the clean likelihood (drop sigma0), or use EDM (PFGM++ D=inf) / DDPM / a Gaussian flow path")
    return kernel


# --------------------------------------------------------------------------------- divergences
def _probes(kind: str, n: int, x: Tensor, generator) -> Tensor:
    if kind == "rademacher":
        return torch.randint(0, 2, (n, *x.shape), generator=generator, device=x.device).to(x.dtype) * 2 - 1
    return torch.randn((n, *x.shape), generator=generator, device=x.device, dtype=x.dtype)


def divergence_exact(v: Tensor, x: Tensor, *, create_graph: bool = False) -> Tensor:
    """tr(dv/dx) per sample with one backward pass per data dimension (for small dimensions)."""
    vf = v.flatten(1)
    dim = vf.shape[1]
    div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for i in range(dim):
        g = torch.autograd.grad(vf[:, i].sum(), x, retain_graph=True, create_graph=create_graph)[0]
        div = div + g.flatten(1)[:, i]
    return div


def divergence_hutchinson(v: Tensor, x: Tensor, probes: Tensor, *, create_graph: bool = False) -> Tensor:
    """mean_k eps_k^T (dv/dx) eps_k per sample: an unbiased estimate of tr(dv/dx) when E[eps eps^T] = I."""
    total = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for k in range(probes.shape[0]):
        g = torch.autograd.grad(v, x, probes[k], retain_graph=True, create_graph=create_graph)[0]
        total = total + (g * probes[k]).flatten(1).sum(1)
    return total / probes.shape[0]


# ------------------------------------------------------------------------------------- the solve
@dataclass
class LikelihoodResult:
    log_prob: Tensor      # (B,) nats, log-density of the (perturbed) data law at x
    prior_log_prob: Tensor
    delta: Tensor         # int div v dt
    log_jacobian: float   # D log alpha_{t0}
    z: Tensor             # state at the prior end
    nfe: int
    t_start: float
    t_end: float


def _check_args(divergence: str, probe: str, probes: int, solver: str, steps, sigma0) -> None:
    if divergence not in DIVERGENCES:
        raise config_error(f"divergence={divergence!r}", f"the divergence is one of {DIVERGENCES}",
                           "use divergence='exact' for small dimensions (<= ~64), 'hutchinson' otherwise")
    if probe not in PROBES:
        raise config_error(f"probe={probe!r}", f"Hutchinson probes are one of {PROBES}",
                           "use 'rademacher' (lower variance) or 'gaussian'")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise config_error(f"probes={probes!r}", "the number of Hutchinson probes per solve must be >= 1",
                           "use probes=1 (average several passes instead for tighter estimates)")
    if solver not in ADAPTIVE + FIXED:
        raise config_error(f"solver={solver!r}", f"likelihoods integrate with torchdiffeq: {ADAPTIVE + FIXED}",
                           "use solver='dopri5' (adaptive) or 'rk4' with steps=...")
    if solver in FIXED and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise config_error(f"solver={solver!r} with steps={steps!r}", "a fixed-step solver needs a step count",
                           "pass steps=100 (or more), or use solver='dopri5'")
    if sigma0 is not None and not (isinstance(sigma0, (int, float)) and math.isfinite(sigma0) and sigma0 > 0):
        raise config_error(f"sigma0={sigma0!r}", "sigma0 is the standard deviation of the data perturbation",
                           "pass a positive number such as 0.05, or sigma0=None for the clean likelihood")


def _fixed_grid(t0: float, t1: float, steps: int) -> Tensor:
    """Geometric spacing when both ends are positive and far apart (sigma-time), else uniform."""
    if t0 > 0 and t1 > 0 and max(t0, t1) / min(t0, t1) > 10:
        grid = torch.logspace(math.log10(t0), math.log10(t1), steps + 1, dtype=torch.float64)
    else:
        grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    grid[0], grid[-1] = t0, t1  # torchdiffeq checks the ends bit-exactly
    return grid


def likelihood_solve(method, net, x: Tensor, sigma0: float | None = None, *, cond=None, divergence: str = "exact",
                     probes: int = 1, probe: str = "rademacher", solver: str = "dopri5", atol: float = 1e-5,
                     rtol: float = 1e-5, steps: int | None = None, generator: torch.Generator | None = None,
                     enable_grad: bool = False) -> LikelihoodResult:
    """``log_likelihood`` with its diagnostics (NFE, prior term, divergence integral, end state)."""
    from torchdiffeq import odeint

    _check_args(divergence, probe, probes, solver, steps, sigma0)
    if sigma0 is None:
        t_start, t_end = method.likelihood_interval()
        scale, shift, log_jac = 1.0, 0.0, 0.0
    else:
        kernel = gaussian_kernel(method)
        t_start, t_end = kernel.time_for(float(sigma0)), kernel.t_prior
        if t_start == kernel.t_data and kernel.t_clean != kernel.t_data:
            t_start = kernel.t_clean
        scale = kernel.alpha(t_start)
        shift = (1 - scale) * torch.as_tensor(kernel.shift, dtype=torch.float64, device=x.device)
        log_jac = x[0].numel() * math.log(scale)
    dtype = x.dtype
    eps = _probes(probe, probes, x, generator) if divergence == "hutchinson" else None
    calls = 0

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal calls
        calls += 1
        with torch.enable_grad():
            xin = state[0].to(dtype)
            if not enable_grad:
                xin = xin.detach()
            if not xin.requires_grad:
                xin = xin.requires_grad_(True)
            v = method.velocity(net, xin, t, cond)
            if divergence == "exact":
                div = divergence_exact(v, xin, create_graph=enable_grad)
            else:
                div = divergence_hutchinson(v, xin, eps, create_graph=enable_grad)
        if not enable_grad:
            v, div = v.detach(), div.detach()
        return v.to(torch.float64), div.to(torch.float64)

    x0 = x.to(torch.float64) * scale + shift
    state0 = (x0, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device))
    ts = torch.tensor([t_start, t_end], dtype=torch.float64, device=x.device)
    if solver in ADAPTIVE:
        kwargs = dict(method=solver, atol=atol, rtol=rtol)
    else:
        grid = _fixed_grid(t_start, t_end, steps).to(x.device)
        # torchdiffeq integrates decreasing time as increasing -t and hands that to the constructor
        kwargs = dict(method=solver, options={"grid_constructor": lambda f, y0, t: grid if t[0] == grid[0] else -grid})
    with torch.set_grad_enabled(enable_grad):
        z, delta = (s[-1] for s in odeint(rhs, state0, ts, **kwargs))
        prior = method.prior_log_prob(z.to(dtype)).to(torch.float64)
    log_prob = prior + delta + log_jac
    return LikelihoodResult(log_prob, prior, delta, log_jac, z, calls, t_start, t_end)


def log_likelihood(method, net, x: Tensor, sigma0: float | None = None, *, cond=None, divergence: str = "exact",
                   probes: int = 1, probe: str = "rademacher", solver: str = "dopri5", atol: float = 1e-5,
                   rtol: float = 1e-5, steps: int | None = None, generator: torch.Generator | None = None,
                   enable_grad: bool = False) -> Tensor:
    """Log-density (nats per sample, (B,) float64) of the model at x via the probability-flow ODE.

    sigma0=None: the model's density at its data end (EDM: at sigma_min). sigma0 > 0: the model's
    density of the data law perturbed by N(0, sigma0^2 I), evaluated at x — pass x already perturbed
    (``evaluate_nll`` draws that perturbation once from a fixed seed). ``enable_grad=True`` keeps the
    graph through the solve (including the divergence), for maximum-likelihood training.
    """
    return likelihood_solve(method, net, x, sigma0, cond=cond, divergence=divergence, probes=probes, probe=probe,
                            solver=solver, atol=atol, rtol=rtol, steps=steps, generator=generator,
                            enable_grad=enable_grad).log_prob


# --------------------------------------------------------------------------------- bits per dim
def metric_name(sigma0: float | None, quantized: bool) -> str:
    """The name a likelihood metric is reported under: the perturbation level is part of the name."""
    if sigma0 is not None:
        return "bpd_perturbed"  # the level is its own key, sigma0, beside it (plain keys: docs/RECORDS.md)
    return "bpd" if quantized else "bpd_clean"


def selection_metric(*, quantized: bool, sigma0: float | None) -> str:
    """The likelihood metric to select models by. Data declared continuous or singular (not 8-bit
    quantized) must use a perturbed likelihood: its clean likelihood rewards collapsing onto the
    training points' support rather than matching the distribution (manifold overfitting)."""
    if not quantized and sigma0 is None:
        raise config_error("model selection by the clean likelihood of continuous data",
                           "on data near a manifold the clean likelihood grows without bound as a model collapses "
                           "onto the support; it ranks broken models best",
                           "select by the perturbed likelihood: pass sigma0 (e.g. nll=true sigma0=0.05)")
    return metric_name(sigma0, quantized)


def truncation_entropy_bpd(method) -> float:
    """Entropy (bits/dim) of the Gaussian kernel at the clean likelihood's start time, in data units:
    the term a variational eps-residual would add (Soft Truncation; score_flow's eps_offset). Not added
    to ``bpd``; reported so that comparisons can say whether it is included."""
    kernel = gaussian_kernel(method)
    rho = kernel.rho(kernel.t_clean)
    if rho == 0:  # e.g. Cond-OT with sigma_min = 0 starts at the data itself: no truncation
        return -math.inf
    return 0.5 * math.log2(2 * math.pi * math.e) + math.log2(rho)


def _quantized_levels(x: Tensor, lo: float, hi: float, n_levels: int) -> Tensor:
    levels = (x.to(torch.float64) - lo) / (hi - lo) * (n_levels - 1)
    ints = levels.round()
    off = (levels - ints).abs().max()
    if bool(off > 1e-3) or bool(ints.min() < 0) or bool(ints.max() > n_levels - 1):
        raise config_error(
            f"the data are not {n_levels}-level (e.g. 8-bit) images in data_range=({lo}, {hi}) (max distance to a level "
            f"{float(off):.3g}, range [{float(x.min()):.3g}, {float(x.max()):.3g}])",
            "bits/dim with uniform dequantization is the likelihood of the integer pixel values; on other "
            "data it is meaningless (can even be negative)",
            "pass the un-augmented held-out images, fix data_range or bits (levels=17 for the 8x8 digits), "
            "or use bits=None with sigma0=... for continuous data")
    return ints


def evaluate_nll(method, net, x: Tensor, *, sigma0: float | None = None, data_range: tuple[float, float] = (-1.0, 1.0),
                 bits: int | None = 8, levels: int | None = None, importance_samples: int = 1, divergence: str = "hutchinson",
                 probe: str = "rademacher", solver: str = "dopri5", atol: float = 1e-5, rtol: float = 1e-5,
                 steps: int | None = None, batch_size: int = 256, cond=None, seed: int = 0,
                 generator: torch.Generator | None = None, progress: bool = True) -> dict:
    """Held-out likelihood of ``x`` (all held-out data, on the evaluation device) as a dict of floats.

    - sigma0=None, bits set: 8-bit images (``levels`` overrides 2^bits, e.g. 17 for the 8x8 digits), uniform dequantization with K = ``importance_samples`` draws
      (importance-weighted bound), keys ``bpd`` (with the data-scaling offset) and ``nll`` (nats/image of
      the dequantized integer data).
    - sigma0 > 0: x + sigma0 eps with eps drawn once from ``seed``; keys ``bpd_perturbed`` (bits/dim of the
      density in data units, no dequantization offset), ``nll_perturbed`` (nats per sample) and ``sigma0``. Hutchinson
      estimates are averaged over K passes.
    - sigma0=None, bits=None: continuous data, clean likelihood: ``bpd_clean``, ``nll_clean``.
    Clean runs also report ``truncation_entropy_bpd`` (the eps-residual's entropy term, NOT included).
    Always: ``bpd_se`` (standard error over samples), ``nfe`` (mean network evaluations per solve),
    ``s_per_image`` (wall time), ``num_samples``, ``importance_samples``, ``dims``.
    """
    if isinstance(importance_samples, bool) or not isinstance(importance_samples, int) or importance_samples < 1:
        raise config_error(f"importance_samples={importance_samples!r}", "K dequantization/probe draws must be >= 1",
                           "use K=1 (fast) or more for a tighter bound")
    lo, hi = float(data_range[0]), float(data_range[1])
    if not hi > lo:
        raise config_error(f"data_range={data_range}", "the data range must be increasing", "use (-1, 1) or (0, 1)")
    _check_args(divergence, probe, 1, solver, steps, sigma0)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    dims = x[0].numel()
    dequantize = sigma0 is None and (bits is not None or levels is not None)
    n_levels = int(levels) if levels is not None else 2 ** int(bits) if bits is not None else 0
    if dequantize:
        if n_levels < 2:
            raise config_error(f"levels={levels}", "quantized data have at least two levels",
                               "use bits=8 (256 levels) or levels=<number of grey levels>")
        ints = _quantized_levels(x, lo, hi, n_levels)
    else:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        data = x if sigma0 is None else x + sigma0 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    repeats = importance_samples if (dequantize or divergence == "hutchinson") else 1
    started, solves, nfe_total = time.perf_counter(), 0, 0
    out = []
    from genflow.progress import track

    batches = track(range(0, x.shape[0], batch_size), description=f"NLL of {x.shape[0]} samples", enabled=progress)
    for b0 in batches:
        sl = slice(b0, b0 + batch_size)
        bcond = None if cond is None else {k: v[sl] for k, v in cond.items()}
        logs = []
        for _ in range(repeats):
            if dequantize:
                u = torch.rand(ints[sl].shape, generator=generator, device=x.device, dtype=torch.float64)
                y = (lo + (hi - lo) * (ints[sl] + u) / n_levels).to(x.dtype)
            else:
                y = data[sl]
            res = likelihood_solve(method, net, y, sigma0, cond=bcond, divergence=divergence, probe=probe,
                                   solver=solver, atol=atol, rtol=rtol, steps=steps, generator=generator)
            logs.append(res.log_prob)
            solves, nfe_total = solves + 1, nfe_total + res.nfe
        logs = torch.stack(logs)
        if dequantize:
            lp = torch.logsumexp(logs, 0) - math.log(repeats) + dims * math.log(hi - lo) - dims * math.log(n_levels)
        else:
            lp = logs.mean(0)
        out.append(lp)
    lp = torch.cat(out)
    elapsed = time.perf_counter() - started
    bpd_each = -lp / (dims * math.log(2))
    if sigma0 is not None:
        key, nll_key = metric_name(sigma0, False), "nll_perturbed"
    elif dequantize:
        key, nll_key = "bpd", "nll"
    else:
        key, nll_key = "bpd_clean", "nll_clean"
    n = lp.numel()
    se = float(bpd_each.std() / math.sqrt(n)) if n > 1 else float("nan")
    out = {key: float(bpd_each.mean()), nll_key: float(-lp.mean()), "bpd_se": se,
           "nfe": nfe_total / max(solves, 1), "s_per_image": elapsed / n, "num_samples": n,
           "importance_samples": importance_samples, "dims": dims}
    if sigma0 is not None:
        out["sigma0"] = float(sigma0)
    if sigma0 is None:
        try:  # the eps-truncation residual is not included in bpd; say how large its entropy part is
            entropy = truncation_entropy_bpd(method)
            if math.isfinite(entropy):
                out["truncation_entropy_bpd"] = entropy
        except ConfigError:
            pass
    return out


__all__ = ["log_likelihood", "likelihood_solve", "evaluate_nll", "gaussian_kernel",
           "divergence_exact", "divergence_hutchinson", "instance_noise_schedule", "add_instance_noise",
           "metric_name", "selection_metric", "LikelihoodResult", "truncation_entropy_bpd"]
