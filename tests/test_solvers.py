"""genflow.solvers on linear ODEs with closed-form solutions: orders of convergence, NFE accounting,
dopri5 accuracy and per-sample step control, float64 state, grid/solver validation, the registry."""
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
    out = solvers.integrate(linear, x0, grid, solver=solver, **kw).x
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
    torch.testing.assert_close(solvers.integrate(linear, x0, grid, solver="euler").x, expect)


@pytest.mark.parametrize("final_correction,expect", [(True, 20), (False, 19)])
def test_heun_nfe_accounting(final_correction, expect):
    calls = []
    grid = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    sol = solvers.integrate(lambda x, t: calls.append(float(t)) or linear(x, t), torch.ones(2), grid, solver="heun",
                            final_correction=final_correction)
    assert len(calls) == expect == sol.nfe == solvers.ode_nfe("heun", 10, final_correction=final_correction)
    if not final_correction:
        assert 0.0 not in calls  # the velocity is never evaluated at the grid's end
    assert solvers.ode_nfe("euler", 10) == 10 and solvers.ode_nfe("dopri5", 10) is None


def test_dopri5_accuracy_and_measured_nfe():
    calls = []
    x0 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    grid = torch.tensor([0.0, 2.0], dtype=torch.float64)
    sol = solvers.integrate(lambda x, t: calls.append(t.tolist()) or linear(x, t), x0, grid, solver="dopri5",
                            atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(sol.x, x0 * math.exp(2 * A), rtol=1e-8, atol=1e-9)
    assert sol.nfe == len(calls) > 6


def test_dopri5_steps_each_sample_on_its_own():
    """Per-sample step control: a stiff sample takes more steps than a gentle one, each sample's result is
    the same alone as in a batch, and both match the closed form x(t) = x0 exp(a t)."""
    rates = torch.tensor([-0.5, -40.0, -3.0], dtype=torch.float64)
    x0 = torch.tensor([[1.0, 2.0], [1.0, -1.0], [0.5, 0.25]], dtype=torch.float64)
    field = lambda r: (lambda x, t: r[:, None] * x)
    grid = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = solvers.integrate(field(rates), x0, grid, solver="dopri5", atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(sol.x, x0 * rates.exp()[:, None], rtol=1e-7, atol=1e-9)
    assert sol.nfe_per_sample[1] > sol.nfe_per_sample[0]
    for i in range(3):
        alone = solvers.integrate(field(rates[i:i + 1]), x0[i:i + 1], grid, solver="dopri5", atol=1e-9, rtol=1e-9)
        assert torch.equal(alone.x[0], sol.x[i]) and int(alone.nfe_per_sample[0]) == int(sol.nfe_per_sample[i])


@pytest.mark.parametrize("grid", [[0.0, 1.0], [1.0, 0.0]])
def test_dopri5_never_evaluates_outside_the_grid(grid):
    # EDM's velocity is singular at sigma = 0, so stepping past the end and interpolating back is not an option
    seen = []
    g = torch.tensor([2.0 + 3 * grid[0], 2.0 + 3 * grid[1]], dtype=torch.float64)
    solvers.integrate(lambda x, t: seen.extend(t.tolist()) or linear(x, t), torch.ones(2, dtype=torch.float64), g,
                      solver="dopri5", atol=1e-3, rtol=1e-3)
    assert min(seen) >= 2.0 - 1e-12 and max(seen) <= 5.0 + 1e-12


def test_state_is_float64_and_velocity_sees_caller_dtype():
    dtypes = []

    def tiny(x, t):
        dtypes.append((x.dtype, t.dtype, t.ndim))
        return torch.full_like(x, 1e-9)

    grid = torch.arange(1001, dtype=torch.float64)
    out = solvers.integrate(tiny, torch.ones(4), grid, solver="euler").x
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
        solvers.ode_nfe("rk4", 10)
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.get("rk4")


def test_registry_holds_every_methods_samplers():
    from genflow.methods import DDPM, EDM, PFGMPP, FlowMatching

    assert set(EDM().solvers()) == {"euler", "heun", "dopri5", "dpmpp_2m", "unipc", "stochastic"}
    assert "stochastic" not in PFGMPP(D=128).solvers() and "stochastic" in PFGMPP(D=None).solvers()
    assert "dpmpp_2m" in PFGMPP(D=128).solvers()
    assert set(DDPM().solvers()) == {"ancestral", "euler", "heun", "dopri5", "dpmpp_2m", "unipc"}
    assert set(FlowMatching().solvers()) == {"euler", "heun", "dopri5", "dpmpp_2m", "unipc"}
    for m in (EDM(), DDPM(), FlowMatching()):
        assert all(name in solvers.SAMPLERS for name in m.solvers())
    assert EDM().nfe(18, "stochastic") == 35 and DDPM().nfe(20, "ancestral") == 20 and EDM().nfe(18, "dopri5") is None
    assert EDM().nfe(10, "dpmpp_2m") == EDM().nfe(10, "unipc") == 10


def test_methods_describe_their_settings():
    """What result rows and JSON lines report, so that no caller asks which method it runs."""
    from genflow.apps.leaderboard import _settings
    from genflow.methods import DDPM, EDM, PFGMPP, SPD, FlowMatching

    assert EDM().describe() == {"method": "EDM", "D": "inf"}
    assert PFGMPP(D=128).describe() == {"method": "PFGM++", "D": 128}
    assert FlowMatching("ko").describe() == {"method": "flow", "path": "ko"}
    assert SPD(T=100).describe() == {"method": "SPD", "T": 100}
    assert DDPM(T=100, schedule="cosine").describe() == {"method": "DDPM", "T": 100, "schedule": "cosine"}
    assert [_settings(m.describe()) for m in (EDM(), PFGMPP(D=128), FlowMatching("ko"))] == ["inf", 128, "ko"]
    assert PFGMPP(D=8).gaussian_marginal() is None and SPD(T=100).gaussian_marginal() is None
    assert EDM().gaussian_marginal().time_for(0.1) == 0.1


# ------------------------------------------------------------------ image i depends only on seed i
class _TinyConvNet(torch.nn.Module):
    """A small nonlinear field that mixes pixels (a 3x3 convolution) and reads the noise label."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.out = torch.nn.Conv2d(4, 1, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x, label, cond=None):
        return self.out(torch.tanh(self.conv(x))) + 0.1 * x * torch.tanh(label.float()).reshape(-1, 1, 1, 1)


def _per_seed_methods():
    from genflow.methods import DDPM, EDM, PFGMPP, SPD, FlowMatching
    from genflow.methods.spd import power_law_spectrum

    return {"edm": EDM(sigma_max=20.0), "pfgmpp": PFGMPP(D=128, sigma_max=20.0),
            "ddpm": DDPM(T=40), "spd": SPD(power_law_spectrum(1.59, 0.5, 2.0, 8, 8), T=40),
            "flow": FlowMatching("condot")}


@pytest.mark.parametrize("name", ["edm", "pfgmpp", "ddpm", "spd", "flow"])
def test_every_solver_png_depends_only_on_its_seed(name, one_thread):
    """PNG bytes of seeds 0..5 drawn in one batch of 6 equal those drawn in batches of 4 + 2 and of 1,
    for every sampler the method registers (dopri5's per-sample step control, the stochastic churn and
    the ancestral noise included)."""
    from torchvision.io import encode_png

    from genflow.sampling import generate, to_uint8

    method, net = _per_seed_methods()[name], _TinyConvNet()
    seeds = list(range(6))
    for solver in method.solvers():
        pngs = []
        for batch in (6, 4, 1):
            churn = {"S_churn": 10.0, "S_noise": 1.003} if solver == "stochastic" else None
            x = generate(method, net, seeds, (1, 8, 8), steps=6, solver=solver, batch_size=batch,
                         solver_options=churn)
            pngs.append([bytes(encode_png(img).numpy()) for img in to_uint8(x)])
        assert pngs[0] == pngs[1] == pngs[2], f"{name}/{solver}: an image changed with the batch size"
        assert len(set(pngs[0])) == len(seeds)  # distinct seeds give distinct images


class _BatchRoundingNet(_TinyConvNet):
    """The tiny net as kernels that round differently for different batch sizes (multi-threaded CPU
    convolutions, GPU kernels chosen per shape): every output moves by about two float32 ulps, up or down
    with the parity of the batch size."""

    def forward(self, x, label, cond=None):
        out = super().forward(x, label, cond)
        return out * (1 + (2.0 ** -22 if x.shape[0] % 2 else -(2.0 ** -22)))


@pytest.mark.parametrize("name", ["edm", "flow"])
def test_batch_dependent_rounding_moves_an_image_by_at_most_one_level(name, one_thread):
    """What the per-seed promise keeps when the network itself is not bitwise batch-independent: fixed-step
    solvers carry the net's rounding (~1e-7) into the image, dopri5 may also flip a step decision (its
    error estimate differences nearly equal stages) and move by a few times its tolerance (1e-5); both stay
    far below one uint8 level (1/127.5), so a pixel changes by at most one level, where it sat on a boundary."""
    from genflow.sampling import generate, to_uint8

    method, net = _per_seed_methods()[name], _BatchRoundingNet()
    seeds = list(range(6))
    for solver in method.solvers():
        x6 = generate(method, net, seeds, (1, 8, 8), steps=6, solver=solver, batch_size=6)
        x1 = generate(method, net, seeds, (1, 8, 8), steps=6, solver=solver, batch_size=1)
        moved = float((x6 - x1).abs().max())
        assert 0 < moved < (0.1 if solver == "dopri5" else 0.001) / 127.5, (solver, moved)  # reached, and small
        assert int((to_uint8(x6).int() - to_uint8(x1).int()).abs().max()) <= 1, solver
