"""genflow.solvers on linear ODEs with closed-form solutions: orders of convergence, NFE accounting,
dopri5 accuracy, float64 state, grid/solver validation."""
import math

import pytest
import torch

from genflow import solvers

A = -1.3  # dx/dt = A x  =>  x(t1) = x(t0) exp(A (t1 - t0))


def linear(x, t):
    return A * x


def error(solver, steps, *, t0=0.0, t1=1.0, **kw):
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    out = solvers.integrate(linear, x0, grid, solver=solver, **kw)
    return float((out - x0 * math.exp(A * (t1 - t0))).abs().max())


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("direction", [(0.0, 1.0), (1.0, 0.0)])
def test_order_of_convergence(solver, order, direction):
    errs = [error(solver, n, t0=direction[0], t1=direction[1]) for n in (16, 32, 64)]
    for coarse, fine in zip(errs, errs[1:]):
        assert coarse / fine == pytest.approx(2 ** order, rel=0.1)


def test_heun_without_final_correction_stays_second_order():
    # EDM's last step is an Euler step: its O(h^2) local error keeps the global order at 2
    errs = [error("heun", n, final_correction=False) for n in (16, 32, 64)]
    assert errs[0] / errs[1] == pytest.approx(4, rel=0.15) and errs[1] / errs[2] == pytest.approx(4, rel=0.15)
    assert errs[2] > error("heun", 64)  # and it differs from the full Heun result


def test_nonuniform_grid_is_followed():
    grid = torch.tensor([2.0, 1.5, 0.7, 0.4, 0.1], dtype=torch.float64)
    x0 = torch.ones(3, dtype=torch.float64)
    seen = []
    solvers.integrate(lambda x, t: seen.append(float(t)) or linear(x, t), x0, grid, solver="euler")
    assert seen == grid[:-1].tolist()
    h = grid.diff()
    expect = x0 * torch.prod(1 + A * h)
    torch.testing.assert_close(solvers.integrate(linear, x0, grid, solver="euler"), expect)


@pytest.mark.parametrize("final_correction,expect", [(True, 20), (False, 19)])
def test_heun_nfe_accounting(final_correction, expect):
    calls = []
    grid = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    solvers.integrate(lambda x, t: calls.append(float(t)) or linear(x, t), torch.ones(2), grid, solver="heun",
                      final_correction=final_correction)
    assert len(calls) == expect == solvers.nfe("heun", 10, final_correction=final_correction)
    if not final_correction:
        assert 0.0 not in calls  # the velocity is never evaluated at the grid's end
    assert solvers.nfe("euler", 10) == 10


def test_dopri5_accuracy_and_measured_nfe():
    calls = []
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grid = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = solvers.integrate(lambda x, t: calls.append(float(t)) or linear(x, t), x0, grid, solver="dopri5",
                            atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, x0 * math.exp(2 * A), rtol=1e-8, atol=1e-9)
    assert solvers.nfe("dopri5", 1) == len(calls) == solvers.integrate.last_nfe > 6


@pytest.mark.parametrize("grid", [[0.0, 1.0], [1.0, 0.0]])
def test_dopri5_never_evaluates_outside_the_grid(grid):
    # EDM's velocity is singular at sigma = 0, so stepping past the end and interpolating back is not an option
    seen = []
    g = torch.tensor([2.0 + 3 * grid[0], 2.0 + 3 * grid[1]], dtype=torch.float64)
    solvers.integrate(lambda x, t: seen.append(float(t)) or linear(x, t), torch.ones(2, dtype=torch.float64), g,
                      solver="dopri5", atol=1e-3, rtol=1e-3)
    assert min(seen) >= 2.0 - 1e-12 and max(seen) <= 5.0 + 1e-12


def test_state_is_float64_and_velocity_sees_caller_dtype():
    dtypes = []

    def tiny(x, t):
        dtypes.append((x.dtype, t.dtype, t.ndim))
        return torch.full_like(x, 1e-9)

    grid = torch.arange(1001, dtype=torch.float64)
    out = solvers.integrate(tiny, torch.ones(4), grid, solver="euler")
    assert out.dtype == torch.float32 and set(dtypes) == {(torch.float32, torch.float64, 0)}
    # 1000 increments of 1e-9 vanish in a float32 state (1 + 1e-9 == 1) but not in float64
    torch.testing.assert_close(out, torch.full((4,), 1 + 1e-6), rtol=0, atol=2e-7)
    assert float(out[0]) > 1.0


def test_callback_sees_every_step():
    seen = []
    grid = torch.linspace(1.0, 0.0, 6, dtype=torch.float64)
    solvers.integrate(linear, torch.ones(2), grid, solver="heun", callback=seen.append)
    assert [s["i"] for s in seen] == list(range(5))
    assert [float(s["t"]) for s in seen] == grid[1:].tolist()


@pytest.mark.parametrize("solver,grid,match", [
    ("rk4", torch.tensor([0.0, 1.0]), "unknown solver"),
    ("heun", torch.tensor([1.0]), "at least two"),
    ("euler", torch.zeros(2, 3), "1-D"),
])
def test_validation_errors(solver, grid, match):
    with pytest.raises(ValueError, match=match):
        solvers.integrate(linear, torch.ones(2), grid, solver=solver)


def test_nfe_rejects_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.nfe("rk4", 10)
