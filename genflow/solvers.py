"""Samplers: one registry of functions with one signature, each returning a ``Solution`` (x and NFE).

Two layers:

- ``integrate(velocity, x, grid, solver=...)`` integrates dx/dt = velocity(x, t) along ``grid`` (a 1-D
  float64 tensor, increasing or decreasing: the method decides its own time). The state is kept in
  float64 for the update arithmetic while ``velocity`` sees the caller's dtype, as in EDM's sampler.

  - ``euler``: x_{i+1} = x_i + h_i v(x_i, t_i)                            (NFE = steps)
  - ``heun``: EDM's Algorithm 1 second-order step; with ``final_correction=False`` the last step (to
    sigma = 0 in EDM) is a plain Euler step                              (NFE = 2 steps - 1)
  - ``dopri5``: adaptive Dormand-Prince 5(4) between the grid's two ends with **per-sample** step-size
    control: every sample (row of x) has its own time, step size and accept/reject decisions, vectorised
    over the batch, so sample i never depends on the others (torchdiffeq shares one step size per
    batch). With ``final_euler=True`` it integrates to ``grid[-2]`` and takes the last step with Euler
    (EDM: the ODE is singular at sigma = 0, and the Euler step from sigma_min is x = D(x; sigma_min)).
    NFE is measured, not predicted.

- ``SAMPLERS``: name -> ``Sampler(run, nfe)``; ``run(method, net, noise, *, steps, cond, generator,
  callback, **options) -> Solution``. The ODE solvers above are registered here for every method; a
  method registers its own (EDM's stochastic Algorithm 2 in ``methods/edm.py``, the VP ancestral
  chain in ``methods/vp.py``) and lists what it offers in ``Method.solvers()``. Randomness comes only
  from ``generator`` (one per sample from ``genflow.sampling.generate``), so image i depends only on
  seed i for every sampler.

- ``dpmpp_2m``: DPM-Solver++(2M) (Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver++: Fast Solver for Guided
  Sampling of Diffusion Probabilistic Models", 2022, Algorithm 2), an exponential integrator of the
  method's data prediction along its Gaussian path x_t = alpha_t x + sigma_t eps, in lambda = ln(alpha/sigma)
  (``Method.alpha_sigma``, ``data_prediction``, ``combine``). Per step, with h = lambda_next - lambda_cur:
  x_next = (sigma_next/sigma_cur) x - alpha_next expm1(-h) D, where D is the current prediction (first
  step, and a step to sigma = 0) or (1 + 1/(2r)) D_cur - 1/(2r) D_prev with r = h_prev/h. Coefficients
  may be per frequency (SPD), applied by ``method.combine``.                      (NFE = steps)

- ``unipc``: UniPC (Zhao, Bai, Rao, Zhou, Lu 2023), the multistep predictor UniP-p and the corrector UniC on
  the same data prediction and path; the corrector reuses the evaluation the next step needs.  (NFE = steps)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]
ODE_SOLVERS = ("euler", "heun", "dopri5")
#: samplers of a method's data prediction along its Gaussian path (``Method.alpha_sigma``)
EXPONENTIAL_SOLVERS = ("dpmpp_2m", "unipc")


@dataclass(frozen=True)
class Solution:
    """A solve's end state and its network evaluations (``nfe``: calls on the batch; dopri5 also gives
    ``nfe_per_sample``, the evaluations each sample needed on its own)."""

    x: Tensor
    nfe: int
    nfe_per_sample: Tensor | None = None


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: ``run`` draws samples, ``nfe(steps, **options)`` predicts its network
    evaluations (None when adaptive: measured in ``Solution.nfe``); ``options``: the settings a user may
    pass it (e.g. EDM's churn), any other is refused (``Method.check_solver``)."""

    name: str
    run: Callable[..., Solution]
    nfe: Callable[..., int | None]
    options: tuple[str, ...] = ()


SAMPLERS: dict[str, Sampler] = {}


def register(name: str, nfe: Callable[..., int | None], options: tuple[str, ...] = ()):
    """Decorator: add ``run(method, net, noise, *, steps, cond, generator, callback, **options)`` as ``name``
    (``options``: the keyword settings a user may give it)."""
    def wrap(run):
        SAMPLERS[name] = Sampler(name, run, nfe, tuple(options))
        return run
    return wrap


def get(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


# ------------------------------------------------------------------------------------ ODE integration
def _check(solver: str, grid: Tensor) -> None:
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(ODE_SOLVERS)}")
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"time grid must be 1-D with at least two times, got shape {tuple(grid.shape)}")


def integrate(velocity: Velocity, x: Tensor, grid: Tensor, *, solver: str = "heun", callback=None,
              final_correction: bool = True, final_euler: bool = False, atol: float = 1e-5,
              rtol: float = 1e-5) -> Solution:
    """Integrate from ``grid[0]`` to ``grid[-1]`` starting at ``x``; the end state keeps x's dtype."""
    _check(solver, grid)
    dtype = x.dtype
    grid = grid.to(device=x.device, dtype=torch.float64)

    def f(state: Tensor, t: Tensor) -> Tensor:
        return velocity(state.to(dtype), t).to(torch.float64)

    if solver == "dopri5":
        ends = grid[[0, -2]] if final_euler else grid[[0, -1]]
        state, per_sample = _dopri5(f, x.to(torch.float64), ends[0], ends[1], atol, rtol)
        nfe = int(per_sample.max()) if per_sample.numel() else 0
        if final_euler:
            state = state + (grid[-1] - grid[-2]) * f(state, grid[-2])
            per_sample, nfe = per_sample + 1, nfe + 1
        if callback is not None:
            callback({"i": 0, "t": grid[-1], "x": state, "nfe": nfe})
        return Solution(state.to(dtype), nfe, per_sample)

    state = x.to(torch.float64)
    steps = grid.numel() - 1
    nfe = 0
    for i in range(steps):
        state, evaluations = heun_step(f, state, grid[i], grid[i + 1],
                                       correct=solver == "heun" and (final_correction or i < steps - 1))
        nfe += evaluations
        if callback is not None:
            callback({"i": i, "t": grid[i + 1], "x": state})
    return Solution(state.to(dtype), nfe)


def heun_step(f, x: Tensor, t_cur: Tensor, t_next: Tensor, *, correct: bool = True) -> tuple[Tensor, int]:
    """One Euler step of dx/dt = f(x, t) from t_cur to t_next, with Heun's trapezoidal correction when
    ``correct``; returns the new state and the evaluations of f it took."""
    h = t_next - t_cur
    d_cur = f(x, t_cur)
    x_next = x + h * d_cur
    if not correct:
        return x_next, 1
    return x + h * (0.5 * d_cur + 0.5 * f(x_next, t_next)), 2


def ode_nfe(solver: str, steps: int, *, final_correction: bool = True, **_) -> int | None:
    """Network evaluations of a fixed-step solve (None for dopri5: adaptive, measured)."""
    if solver == "euler":
        return steps
    if solver == "heun":
        return 2 * steps if final_correction else 2 * steps - 1
    if solver == "dopri5":
        return None
    raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(ODE_SOLVERS)}")


# ------------------------------------------------------------------------ per-sample Dormand-Prince
# Butcher tableau of Dormand & Prince (1980), RK5(4)7FSAL
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((),
      (1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))
#: step-size controller of Hairer, Norsett & Wanner (and torchdiffeq): safety and growth limits
_SAFETY, _GROW, _SHRINK = 0.9, 10.0, 0.2
_MAX_ITERATIONS = 100_000


def _rms(v: Tensor) -> Tensor:
    """Per-sample root mean square over every dimension but the first."""
    return v.reshape(v.shape[0], -1).square().mean(1).sqrt()


def _dopri5(f, x: Tensor, t0: Tensor, t1: Tensor, atol: float, rtol: float) -> tuple[Tensor, Tensor]:
    """Adaptive Dormand-Prince from t0 to t1, one time and step size per sample (row of x).

    Every evaluation runs on the whole batch, with a sample that has reached t1 held there by a zero
    step, so the batch shape never changes; each sample's arithmetic involves only its own row.
    Returns (x at t1, evaluations each sample needed)."""
    b = x.shape[0]
    span = t1 - t0
    direction = torch.sign(span)
    if float(span) == 0.0:
        return x, torch.zeros(b, dtype=torch.int64, device=x.device)
    view = lambda v: v.reshape(b, *([1] * (x.ndim - 1)))
    t = t0.expand(b).clone()
    scale0 = atol + rtol * x.abs()
    k1 = f(x, t)
    # initial step (Hairer et al. II.4): h0 from ||x|| / ||f||, refined by one Euler probe
    d0, d1 = _rms(x / scale0), _rms(k1 / scale0)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span.abs().expand(b))
    k_probe = f(x + view(direction * h0) * k1, t + direction * h0)
    d2 = _rms((k_probe - k1) / scale0) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / dmax) ** (1 / 5))
    h = torch.minimum(torch.minimum(100 * h0, h1), span.abs().expand(b))
    evals = torch.full((b,), 2, dtype=torch.int64, device=x.device)
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    for _ in range(_MAX_ITERATIONS):
        if not bool(active.any()):
            return x, evals
        remaining = (t1 - t).abs()
        last = active & (h >= remaining)
        step = torch.where(active, torch.minimum(h, remaining), torch.zeros_like(h))
        hs = view(direction * step)
        ks = [k1]
        for i in range(1, 7):
            xi = x + hs * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
            ks.append(f(xi, t + direction * step * _C[i]))
        x5 = xi  # the 7th stage point is the 5th-order solution (FSAL)
        err = hs * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x5.abs())
        norm = _rms(err / scale)
        accept = active & (norm <= 1)
        evals = evals + 6 * active.to(torch.int64)
        acc = view(accept)
        x = torch.where(acc, x5, x)
        k1 = torch.where(acc, ks[6], k1)
        # land exactly on t1 on the last step (no evaluation past the end: EDM is singular beyond it)
        t = torch.where(accept, torch.where(last, t1.expand(b), t + direction * step), t)
        factor = torch.where(norm == 0, torch.full_like(norm, _GROW),
                             (_SAFETY * norm.clamp_min(1e-300) ** (-1 / 5)).clamp(_SHRINK, _GROW))
        h = torch.where(active, step * factor, h)
        active = active & ~(accept & last)
    raise RuntimeError(f"dopri5 did not reach t={float(t1)} in {_MAX_ITERATIONS} steps (atol={atol}, rtol={rtol})")


# ------------------------------------------------------------------- the ODE samplers of every method
def _ode_sampler(solver: str):
    def run(method, net, noise: Tensor, *, steps: int, cond=None, generator=None, callback=None,
            **options) -> Solution:
        # dopri5 chooses its own steps: it reads only the grid's ends (and, with final_euler, its last step)
        grid = method.time_grid(2 if solver == "dopri5" else steps, device=noise.device)
        return integrate(lambda x, t: method.velocity(net, x, t, cond), noise, grid, solver=solver,
                         callback=callback, **options)

    run.__name__ = run.__qualname__ = f"ode_{solver}"
    run.__doc__ = f"The probability-flow ODE along ``method.time_grid(steps)`` with ``integrate(solver={solver!r})``."
    return run


for _name in ODE_SOLVERS:
    register(_name, lambda steps, _s=_name, **options: ode_nfe(_s, steps, **options))(_ode_sampler(_name))


# ---------------------------------------------------------------- exponential integrators (DPM-Solver++)
#: a path coefficient this small relative to the other is an end of the path in float64 rounding
#: (a kinetic-optimal path's sigma(1) = cos(pi/2) = 6e-17): lambda is infinite there, not ~37
_END = 1e-12


def _path(method, t: Tensor) -> tuple[Tensor, Tensor]:
    """``method.alpha_sigma(t)`` with rounding-level coefficients set to 0 (the path's exact ends)."""
    alpha, sigma = method.alpha_sigma(t)
    return (torch.where(alpha <= _END * sigma, torch.zeros_like(alpha), alpha),
            torch.where(sigma <= _END * alpha, torch.zeros_like(sigma), sigma))


def _log_snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """lambda = ln(alpha/sigma): -inf where alpha = 0 (pure noise), +inf where sigma = 0 (clean data)."""
    return alpha.log() - sigma.log()


#: time grids of the exponential integrator: the model's own, uniform in log-SNR, or EDM's rho-spacing
SCHEDULES = ("model", "logsnr", "karras")
#: EDM's largest noise level (Karras et al. 2022): after a noise end at alpha = 0 the log-SNR and rho grids
#: start at least as far out as sigma/alpha = 80
EDM_SIGMA_MAX = 80.0


def mean_log_snr(method, t: Tensor) -> Tensor:
    """lambda(t) = ln(alpha_t / sigma_t) at the times ``t`` (1-D), averaged over the coefficients of a
    per-frequency path (monotone in t, as every frequency's lambda is)."""
    return _log_snr(*_path(method, t)).reshape(t.numel(), -1).mean(1)


def exponential_grid(method, steps: int, schedule: str = "model", rho: float = 7.0, device=None) -> Tensor:
    """``steps + 1`` times for an exponential integrator.

    ``model``: ``method.time_grid(steps)``. ``logsnr``: uniform in the (mean) log-SNR lambda, and
    ``karras``: Karras et al.'s rho-spacing of e^-lambda (= sigma/alpha; EDM's sigma), both between the
    first and last times of the method's own grid where lambda is finite; an end where lambda is infinite
    (alpha = 0 at a flow's noise end, sigma = 0 at EDM's or a flow's data end) stays the grid's end, and after
    a noise end at alpha = 0 the first finite point is at sigma/alpha >= EDM's sigma_max = 80."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    own = method.time_grid(steps, device=device)
    if schedule == "model":
        return own
    lam = mean_log_snr(method, own)
    finite = torch.isfinite(lam).nonzero().flatten()
    first, last = int(finite[0]), int(finite[-1])
    n = last - first
    if n < 1:
        return own
    lo, hi = lam[first], lam[last]
    if first > 0:
        # after a noise end at alpha = 0 the first finite point lies at least as far out as EDM's sigma_max: the
        # step out of pure noise is first order on the prediction there (the data mean), and the own grid's
        # neighbour depends on the steps and the path (a kinetic-optimal path has alpha/sigma = 0.34 at t = 0.1)
        lo = torch.clamp(lo, max=-math.log(EDM_SIGMA_MAX))
    u = torch.linspace(0, 1, n + 1, dtype=torch.float64, device=own.device)
    if schedule == "logsnr":
        targets = lo + u * (hi - lo)
    else:
        a, b = (-lo).exp() ** (1 / rho), (-hi).exp() ** (1 / rho)
        targets = -((a + u * (b - a)) ** rho).log()
    # bisection on lambda(t), monotone between the two ends whichever way time runs
    t0 = own[first - 1 if first > 0 else first].expand(n + 1).clone()
    t1 = own[last].expand(n + 1).clone()
    for _ in range(100):
        mid = 0.5 * (t0 + t1)
        below = mean_log_snr(method, mid) < targets
        t0, t1 = torch.where(below, mid, t0), torch.where(below, t1, mid)
    inner = 0.5 * (t0 + t1)
    if first == 0:
        inner[0] = own[first]
    inner[-1] = own[last]
    return torch.cat([own[:first], inner, own[last + 1:]])


@register("dpmpp_2m", nfe=lambda steps, **_: steps, options=("schedule", "rho", "grid"))
def dpmpp_2m(method, net, noise: Tensor, *, steps: int, cond=None, generator=None, callback=None,
             schedule: str = "model", rho: float = 7.0, grid: Tensor | None = None) -> Solution:
    """DPM-Solver++(2M) along ``exponential_grid(method, steps, schedule, rho)`` (or the times ``grid``): one
    data prediction per step.

    The update is the exact solution of the probability-flow ODE written in lambda,
    x_t / sigma_t = x_s / sigma_s + int_{lambda_s}^{lambda_t} e^lambda x_data(lambda) dlambda (Lu et al.
    Eq. 9), with x_data extrapolated linearly in lambda from the last two predictions. Where h is infinite (a step from alpha = 0, or to sigma = 0) the
    step is first order, x_next = (sigma_next/sigma_cur) x + alpha_next D, as in k-diffusion. The state is
    float64; the net sees x's dtype."""
    if grid is None:
        grid = exponential_grid(method, steps, schedule, rho, device=noise.device)
    grid = grid.to(noise.device, torch.float64)
    dtype, x = noise.dtype, noise.to(torch.float64)
    alpha, sigma = zip(*(_path(method, t) for t in grid))
    lam = [_log_snr(a, s) for a, s in zip(alpha, sigma)]
    previous, h_previous = None, None
    for i in range(grid.numel() - 1):
        denoised = method.data_prediction(net, x.to(dtype), grid[i], cond).to(torch.float64)
        # +inf - +inf (or -inf) cannot occur; -inf -> +inf (one step from noise to data) is a single jump
        h = lam[i + 1] - lam[i]
        h = torch.where(torch.isnan(h), torch.full_like(h, math.inf), h)
        ratio = sigma[i + 1] / sigma[i]
        weight = -alpha[i + 1] * torch.expm1(-h)  # alpha_next (1 - e^-h), alpha_next where h = inf
        if previous is None:
            x = method.combine((x, ratio), (denoised, weight))
        else:
            # 1/(2r) = h / (2 h_prev): 0 after an infinite step (first order), none at an infinite h
            k = torch.where(torch.isfinite(h), h / (2 * h_previous), torch.zeros_like(h))
            x = method.combine((x, ratio), (denoised, weight * (1 + k)), (previous, -weight * k))
        previous, h_previous = denoised, h
        if callback is not None:
            callback({"i": i, "t": grid[i + 1], "x": x, "denoised": denoised})
    return Solution(x.to(dtype), grid.numel() - 1)


# ------------------------------------------------------------------------------------------ UniPC
#: the two B(h) of UniPC's coefficients (Zhao et al. 2023): bh1 B(h) = h, bh2 B(h) = e^h - 1 (written with
#: h -> -h for the data prediction)
UNIPC_VARIANTS = ("bh1", "bh2")
UNIPC_ORDERS = (1, 2, 3)
#: with fewer steps than this the last steps lower their order (order <= steps left), as DPM-Solver++ and
#: diffusers' UniPC do for few steps: their lambda steps are long and extrapolating across them overshoots;
#: with more steps every step keeps the full order, so the global error falls at order p + 1
LOWER_ORDER_FINAL_BELOW = 15


def unipc_b(h: Tensor, p: int, variant: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(e^z - 1, B, [b_1 .. b_p]) for a step of h in lambda, z = -h (data prediction): b_k = k! g_k / B with
    g_k = (e^z - sum_{j<=k} z^j/j!) / z^k = z phi_(k+1)(z) (UniPC's h phi_(k+1)(h) k!/B(h)), by the
    recursion g_k = g_(k-1)/z - 1/k! from g_0 = e^z - 1; B = z (bh1) or e^z - 1 (bh2)."""
    z = -h
    e = torch.expm1(z)
    B = z if variant == "bh1" else e
    g, b = e, []
    for k in range(1, p + 1):
        g = g / z - 1 / math.factorial(k)
        b.append(math.factorial(k) * g / B)
    return e, B, b


def _unipc_combine(method, x: Tensor, ratio: Tensor, a: Tensor, e: Tensor, B: Tensor, d0: Tensor, terms, rho) -> Tensor:
    """(sigma_next/sigma_cur) x - alpha_next (e^-h - 1) D_0 - alpha_next B(h) sum_k rho_k (D_k - D_0)/r_k for
    ``terms`` = [(D_k, r_k)], as ``method.combine`` of x and the predictions (coefficients per frequency)."""
    pairs, w0 = [(x, ratio)], -a * e
    for (d_k, r_k), rho_k in zip(terms, rho):
        c = -a * B * rho_k / r_k
        pairs.append((d_k, c))
        w0 = w0 - c
    return method.combine(*pairs, (d0, w0))


def _solve_rows(r: list[Tensor], b: list[Tensor]) -> Tensor:
    """rho with sum_k rho_k r_k^m = b_m (m = 0 .. len(r) - 1), per coefficient (UniPC's R_p rho = b): the last
    dimension of the result indexes k."""
    n = len(r)
    rows = torch.stack([torch.stack([rk ** m for rk in r], -1) for m in range(n)], -2)
    return torch.linalg.solve(rows, torch.stack(b[:n], -1))


@register("unipc", nfe=lambda steps, **_: steps,
          options=("schedule", "rho", "grid", "order", "variant", "lower_order_final"))
def unipc(method, net, noise: Tensor, *, steps: int, cond=None, generator=None, callback=None,
          schedule: str = "model", rho: float = 7.0, grid: Tensor | None = None, order: int = 2,
          variant: str = "bh2", lower_order_final: bool = True) -> Solution:
    """UniPC (Zhao, Bai, Rao, Zhou, Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models", NeurIPS 2023, multistep, data prediction): the multistep predictor UniP-p and the
    corrector UniC along ``exponential_grid(method, steps, schedule, rho)`` (or the times ``grid``), one data
    prediction per step.

    In lambda = ln(alpha/sigma), with h = lambda_next - lambda_cur, D_0 the prediction at the current point and
    D_k (k = 1 .. p-1) at the k-th previous one, r_k = (lambda_k - lambda_cur)/h and D1_k = (D_k - D_0)/r_k:

    - predictor UniP-p: x~ = (sigma_next/sigma_cur) x - alpha_next (e^-h - 1) D_0
      - alpha_next B(h) sum_k rho^p_k D1_k, with sum_k rho^p_k r_k^m = b_(m+1), m = 0 .. p-2
      (rho^p = 1/2 for p = 2, as the authors' code), b_m = m! phi_(m+1)(-h) / B(h) (``unipc_b``);
    - corrector UniC-p: the prediction D~ at x~ is the one the next step needs anyway; the step is taken again
      with one more difference D1_p = D~ - D_0 at r_p = 1, solving the p x p system (rho^c = 1/2 for p = 1).
      The next step starts from the corrected x with D~ as its D_0 (NFE = steps); the last step has no
      corrector.

    UniP-p is of order p and UniC raises it to p + 1. The order p of a step is ``order`` but at most one more
    than the earlier points on the path (the first steps), and, with ``lower_order_final`` and fewer than
    ``LOWER_ORDER_FINAL_BELOW`` steps, at most the steps left. A step with infinite h (from alpha = 0 or to
    sigma = 0) is first order, x_next = (sigma_next/sigma_cur) x + alpha_next D_0, without corrector, and a point
    with infinite lambda takes no part in the differences. Coefficients may be per frequency (SPD), applied by
    ``method.combine``. The state is float64; the net sees x's dtype."""
    if order not in UNIPC_ORDERS:
        raise ValueError(f"order={order!r} is not one of {UNIPC_ORDERS}")
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {', '.join(UNIPC_VARIANTS)}")
    if grid is None:
        grid = exponential_grid(method, steps, schedule, rho, device=noise.device)
    grid = grid.to(noise.device, torch.float64)
    n = grid.numel() - 1
    dtype, x = noise.dtype, noise.to(torch.float64)
    alpha, sigma = zip(*(_path(method, t) for t in grid))
    lam = [_log_snr(a, s) for a, s in zip(alpha, sigma)]
    finite = torch.stack([torch.isfinite(v).all() for v in lam]).tolist()  # one sync, before the net runs
    # the last point with finite lambda: a step from it to sigma = 0 is the plain prediction there (the authors'
    # denoise_to_zero), so the order lowers towards that point and the steps before it are counted
    end = max((j for j, f in enumerate(finite) if f), default=n)
    lower = lower_order_final and end < LOWER_ORDER_FINAL_BELOW
    history: list[tuple[Tensor, Tensor]] = []  # (lambda, D) of earlier points with finite lambda, newest last
    denoised = method.data_prediction(net, x.to(dtype), grid[0], cond).to(torch.float64)
    for i in range(n):
        a, ratio = alpha[i + 1], sigma[i + 1] / sigma[i]
        last = i == n - 1
        rho_c = None
        if not (finite[i] and finite[i + 1]):  # h = inf: alpha_next (1 - e^-h) = alpha_next, first order
            x_next = method.combine((x, ratio), (denoised, a))
        else:
            p = min(order, len(history) + 1, end - i if lower else order)
            h = lam[i + 1] - lam[i]
            e, B, b = unipc_b(h, p, variant)
            earlier = history[len(history) - (p - 1):][::-1] if p > 1 else []  # D_1 .. D_(p-1), newest first
            terms = [(d_k, (lam_k - lam[i]) / h) for lam_k, d_k in earlier]  # (D_k, r_k)
            r = [r_k for _, r_k in terms]
            rho_p = [] if p == 1 else [torch.full_like(h, 0.5)] if p == 2 else _solve_rows(r, b).unbind(-1)
            x_next = _unipc_combine(method, x, ratio, a, e, B, denoised, terms, rho_p)
            if not last:
                rho_c = [torch.full_like(h, 0.5)] if p == 1 else _solve_rows([*r, torch.ones_like(h)], b).unbind(-1)
        if not last:
            new = method.data_prediction(net, x_next.to(dtype), grid[i + 1], cond).to(torch.float64)
            if rho_c is not None:  # UniC: the step again with the new prediction as one more difference
                x_next = _unipc_combine(method, x, ratio, a, e, B, denoised, [*terms, (new, torch.ones_like(h))],
                                        rho_c)
        x = x_next
        if finite[i]:
            history = [*history, (lam[i], denoised)][-(order - 1):] if order > 1 else []
        if callback is not None:
            callback({"i": i, "t": grid[i + 1], "x": x, "denoised": denoised})
        if not last:
            denoised = new
    return Solution(x.to(dtype), n)
