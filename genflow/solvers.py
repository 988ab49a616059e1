"""ODE solvers over a velocity callable and a time grid: one signature for all (k-diffusion style).

``integrate(velocity, x, grid, solver=...)`` integrates dx/dt = velocity(x, t) along ``grid``
(a 1-D float64 tensor, increasing or decreasing: the method decides its own time). The state is
kept in float64 for the update arithmetic while ``velocity`` sees the caller's dtype, as in EDM's
sampler.

- ``euler``: x_{i+1} = x_i + h_i v(x_i, t_i)                              (NFE = steps)
- ``heun``: EDM's Algorithm 1 second-order step; with ``final_correction=False`` the last step
  (to sigma = 0 in EDM) is a plain Euler step                              (NFE = 2 steps - 1)
- ``dopri5``: adaptive Dormand-Prince via torchdiffeq between the grid's two ends (atol, rtol);
  the number of evaluations is measured, not predicted.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

SOLVERS = ("euler", "heun", "dopri5")
Velocity = Callable[[Tensor, Tensor], Tensor]


def _check(solver: str, grid: Tensor) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"time grid must be 1-D with at least two times, got shape {tuple(grid.shape)}")


def integrate(velocity: Velocity, x: Tensor, grid: Tensor, *, solver: str = "heun", callback=None,
              final_correction: bool = True, atol: float = 1e-5, rtol: float = 1e-5) -> Tensor:
    """Integrate from ``grid[0]`` to ``grid[-1]`` starting at ``x``; returns x at ``grid[-1]`` in x's dtype."""
    _check(solver, grid)
    dtype = x.dtype
    grid = grid.to(device=x.device, dtype=torch.float64)

    def f(state: Tensor, t: Tensor) -> Tensor:
        return velocity(state.to(dtype), t).to(torch.float64)

    if solver == "dopri5":
        return _dopri5(f, x.to(torch.float64), grid, atol, rtol, callback).to(dtype)

    state = x.to(torch.float64)
    steps = grid.numel() - 1
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        h = t_next - t_cur
        d_cur = f(state, t_cur)
        x_next = state + h * d_cur
        if solver == "heun" and (final_correction or i < steps - 1):
            d_next = f(x_next, t_next)
            x_next = state + h * (0.5 * d_cur + 0.5 * d_next)
        state = x_next
        if callback is not None:
            callback({"i": i, "t": t_next, "x": state})
    return state.to(dtype)


def _dopri5(f, x: Tensor, grid: Tensor, atol: float, rtol: float, callback) -> Tensor:
    from torchdiffeq import odeint

    calls = 0

    def rhs(t: Tensor, state: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return f(state, t)

    ends = torch.stack([grid[0], grid[-1]])
    # torchdiffeq steps past the last time and interpolates back; forcing a step to land on the end
    # keeps every evaluation inside the grid (EDM's velocity is singular beyond sigma = 0)
    out = odeint(rhs, x, ends, method="dopri5", atol=atol, rtol=rtol, options={"step_t": ends[1:]})[-1]
    if callback is not None:
        callback({"i": 0, "t": grid[-1], "x": out, "nfe": calls})
    integrate.last_nfe = calls
    return out


def nfe(solver: str, steps: int, *, final_correction: bool = True, **_) -> int:
    """Network evaluations for a fixed-step solve; dopri5's count is known only after the solve
    (``integrate.last_nfe``)."""
    if solver == "euler":
        return steps
    if solver == "heun":
        return 2 * steps if final_correction else 2 * steps - 1
    if solver == "dopri5":
        return int(getattr(integrate, "last_nfe", 0))
    raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
