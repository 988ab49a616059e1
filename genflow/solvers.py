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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]
ODE_SOLVERS = ("euler", "heun", "dopri5")


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
