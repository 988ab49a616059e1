"""DPM-Solver++(2M) against mathematics: on data whose denoiser is known in closed form, the global error
of ``solver=dpmpp_2m`` falls at order 2 as the steps double, for every method's Gaussian path (EDM, PFGM++
at D = 8, 128, inf, flow matching on each path, DDPM, SPD per frequency); and it equals k-diffusion's
``sample_dpmpp_2m`` on ``get_sigmas_karras`` for EDM (when k-diffusion is installed, or KDIFFUSION_DIR
points at its source)."""
import importlib
import importlib.util
import math
import os
import sys
import types

import pytest
import torch

from genflow import solvers
from genflow.methods import DDPM, EDM, PFGMPP, SPD, FlowMatching
from solver_cases import (F64, PATHS, DDPMNet, EDMNet, FlowNet, SPDNet, assert_order, check_guidance_and_nfe,
                          check_rounding_level_sigma_is_the_data_end, gaussian_denoiser, gaussian_flow, gens,
                          lambda_uniform, orders, pfgmpp_denoiser, solve_errors, spectrum)

#: steps whose doublings give the measured orders (the asymptotic range: the first steps of a 2M solve
#: from sigma_max are first order, which dominates below ~16 steps)
STEPS = (32, 64, 128)


def assert_second_order(errors):
    assert_order(errors, 2)


def test_edm_gaussian_order_two():
    """EDM (alpha = 1, lambda = -ln sigma) for Gaussian data, sigma_max -> sigma_min, on the default rho-grid
    (its lambda steps shrink uniformly) and uniform in lambda. The step to sigma = 0 is a denoise (exact only
    as sigma_min -> 0), so the error is measured at sigma_min."""
    m = EDM()
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    for make in (lambda n: m.time_grid(n + 1)[:-1], lambda n: lambda_uniform(m, m.sigma_max, m.sigma_min, n)):
        assert_second_order(solve_errors("dpmpp_2m", m, EDMNet(m, gaussian_denoiser), x0, [make(n) for n in STEPS],
                                         lambda g: gaussian_flow(m, x0, g)))


@pytest.mark.parametrize("D", [8, 128, math.inf])
def test_pfgmpp_order_two_at_every_D(D):
    """PFGM++ with r = sigma sqrt(D) has EDM's ODE dx/dsigma = (x - D(x, sigma))/sigma with D's own
    denoiser; the reference solution integrates the closed-form field with dopri5 at 1e-12. Measured
    (64 -> 128 -> 256 steps): 1.82-1.95."""
    m = PFGMPP(D=D, sigma_max=10.0, sigma_min=0.02)
    net = EDMNet(m, pfgmpp_denoiser(D))
    x0 = m.prior_sample((6, 4), generator=gens(6)).to(F64)
    ends = torch.tensor([m.sigma_max, m.sigma_min], dtype=F64)
    ref = solvers.integrate(lambda x, t: m.velocity(net, x, t), x0, ends, solver="dopri5", atol=1e-12,
                            rtol=1e-12).x
    # 64 -> 256 steps: the posterior weights switch sharply near sigma ~ the points' spacing
    grids = [lambda_uniform(m, m.sigma_max, m.sigma_min, n) for n in (64, 128, 256)]
    assert_second_order(solve_errors("dpmpp_2m", m, net, x0, grids, lambda g: ref))


# ------------------------------------------------------------------------------------- flow matching


@pytest.mark.parametrize("path", list(PATHS))
def test_flow_matching_order_two_on_every_path(path):
    """Each affine path, t = 0.02 -> 0.98 uniform in lambda = ln(alpha_t/sigma_t), against the Gaussian map."""
    spec = PATHS[path]
    m = FlowMatching(spec if isinstance(spec, str) else spec())
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    grids = [lambda_uniform(m, 0.02, 0.98, n) for n in STEPS]
    assert_second_order(solve_errors("dpmpp_2m", m, FlowNet(m), x0, grids, lambda g: gaussian_flow(m, x0, g)))


def test_flow_matching_whole_path_converges():
    """From alpha = 0 (lambda = -inf) to sigma = 0 (lambda = +inf) on the default uniform grid: the first
    and last steps are first order and the end steps do not shrink in lambda, so the error falls at
    order 1.5 to 2 (measured 1.56-1.69 on Cond-OT for 32..1024 steps); it falls, and is small."""
    m = FlowMatching("condot")
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    errors = [float((m.solve(FlowNet(m), x0, steps=n, solver="dpmpp_2m", schedule="model").x
                     - gaussian_flow(m, x0, m.time_grid(n))).abs().max()) for n in STEPS]
    assert all(1.2 < p < 2.3 for p in orders(errors)) and errors[-1] < 2e-3


def test_flow_matching_normalised_data_space():
    """normalize=True: the path is affine around the data mean in data space; the solve equals the one in
    normalised space mapped back (same seeds, same field)."""
    m = FlowMatching("cosine", normalize=True)
    m.shift, m.scale = torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([2.0, 0.5, 1.0, 1.5])
    plain = FlowMatching("cosine")
    net = FlowNet(plain)
    z0 = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    z1 = plain.solve(net, z0, steps=12, solver="dpmpp_2m").x  # on the rho grid, flow matching's default
    x1 = m.solve(net, m.from_normalized(z0), steps=12, solver="dpmpp_2m").x
    torch.testing.assert_close(x1, m.from_normalized(z1), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------- DDPM / SPD


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_order_two(schedule):
    m = DDPM(schedule=schedule, T=1000)
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    grids = [lambda_uniform(m, m.s_hi, m.s_lo, n) for n in STEPS]  # s_hi -> s_lo, both with finite lambda
    assert_second_order(solve_errors("dpmpp_2m", m, DDPMNet(m), x0, grids, lambda g: gaussian_flow(m, x0, g)))


def test_spd_order_two_per_frequency():
    """U_k(t) = U_k(s) sqrt(lambda_k(t) / lambda_k(s)), lambda = abar S + 1 - abar, every frequency on its
    own lambda_k = ln(alpha_k / sigma_k): the exponential integrator runs per frequency."""
    m = SPD(spectrum(), T=1000)
    x0 = m.prior_sample((4, 1, 8, 8), generator=gens(4)).to(F64)
    # uniform in the mean lambda over frequencies; each frequency's own steps shrink as 1/n
    grids = [lambda_uniform(m, m.s_hi, m.s_lo, n) for n in STEPS]
    exact = lambda g: m.combine((x0, (m.marginal_variance(g[-1]) / m.marginal_variance(g[0])).sqrt()))
    assert_second_order(solve_errors("dpmpp_2m", m, SPDNet(m), x0, grids, exact))


# ---------------------------------------------------------------------------------------- contract
def test_nfe_is_steps_and_guidance_mixes_predictions():
    check_guidance_and_nfe("dpmpp_2m")


def test_refused_where_there_is_no_gaussian_path():
    from genflow.errors import ConfigError

    flow = FlowMatching("condot")
    retimed = flow.retimed("cosine")
    assert "dpmpp_2m" in flow.solvers() and "dpmpp_2m" not in retimed.solvers()
    with pytest.raises(ConfigError, match="dpmpp_2m"):
        retimed.solve(lambda x, t, c=None: x, torch.zeros(2, 2), steps=4, solver="dpmpp_2m")


# ------------------------------------------------------------------------------ k-diffusion, side by side
def _k_diffusion_sampling():
    """k-diffusion's ``sampling`` module, from the installed package or KDIFFUSION_DIR, loaded on its own
    (its package __init__ imports training and evaluation dependencies the sampler does not need)."""
    root = os.environ.get("KDIFFUSION_DIR")
    if root:
        locations = [os.path.join(root, "k_diffusion")]
    else:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            pytest.skip("k-diffusion is not installed (pip install k-diffusion) and KDIFFUSION_DIR is unset")
        locations = list(spec.submodule_search_locations)
    saved = {k: v for k, v in sys.modules.items() if k == "k_diffusion" or k.startswith("k_diffusion.")}
    package = types.ModuleType("k_diffusion")
    package.__path__ = locations
    sys.modules["k_diffusion"] = package
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as e:
        pytest.skip(f"k-diffusion's sampler does not import here: {e}")
    finally:
        for k in [k for k in sys.modules if k == "k_diffusion" or k.startswith("k_diffusion.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.parametrize("steps", [2, 5, 18])
def test_equals_k_diffusion_sample_dpmpp_2m(steps):
    """EDM with steps=N on its rho-grid is k-diffusion's sample_dpmpp_2m on get_sigmas_karras(N, sigma_min,
    sigma_max, rho): the same noise levels (k-diffusion builds them in float32) and, on the same levels in
    float64, the same samples to float64 rounding, with N network evaluations in both."""
    kd = _k_diffusion_sampling()
    m = EDM(sigma_max=40.0, sigma_min=0.01, rho=5.0)
    net = EDMNet(m, pfgmpp_denoiser(math.inf))
    sigmas = kd.get_sigmas_karras(steps, m.sigma_min, m.sigma_max, m.rho)
    grid = m.time_grid(steps)
    # float32 rounding of k-diffusion's ramp and power: a few ulp times rho
    torch.testing.assert_close(sigmas.to(F64), grid, rtol=10 * m.rho * 2.0 ** -24, atol=0)

    calls = []

    def model(x, sigma):
        calls.append(1)
        return m.denoise(net, x, sigma)

    x0 = m.prior_sample((5, 4), generator=gens(5)).to(F64)
    theirs = kd.sample_dpmpp_2m(model, x0, grid, disable=True)
    ours = m.solve(net, x0, steps=steps, solver="dpmpp_2m")
    assert ours.nfe == len(calls) == steps
    torch.testing.assert_close(ours.x, theirs, rtol=1e-12, atol=1e-12)
    # on k-diffusion's own float32 levels, in float32 (the protocol of its samplers)
    theirs32 = kd.sample_dpmpp_2m(model, x0.float(), sigmas, disable=True)
    torch.testing.assert_close(m.solve(net, x0.float(), steps=steps, solver="dpmpp_2m").x, theirs32,
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- everywhere a solver is named
def test_likelihood_refuses_it_with_the_reason():
    from genflow.errors import ConfigError
    from genflow.likelihood import log_likelihood

    with pytest.raises(ConfigError, match="not an ODE integrator of the joint state"):
        log_likelihood(EDM(), lambda *a: a[0], torch.zeros(1, 2), solver="dpmpp_2m")


def test_sample_and_evaluate_command_lines(cli, trained_ckpt, tmp_path):
    """sample.py draws with solver=dpmpp_2m (NFE = steps, guidance on the class-conditional model);
    evaluate refuses it as the likelihood's solver before loading the model (exit 2)."""
    import json

    code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", "seeds=0-1", "steps=3", "solver=dpmpp_2m",
                         "guidance=2", f"out={tmp_path / 's'}", "progress=false")
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["solver"] == "dpmpp_2m" and line["nfe"] == 3 and (tmp_path / "s" / "grid.png").is_file()
    code, out, err = cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", "fid.num=0", "nll=true", "nll_solver=dpmpp_2m")
    assert code == 2 and "not an ODE integrator" in err
    # the time grid is a setting of the exponential integrators only
    code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", "seeds=0-1", "steps=3", "solver=dpmpp_2m",
                         "schedule=karras", f"out={tmp_path / 'k'}", "progress=false")
    assert code == 0, err
    code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", "seeds=0-1", "steps=3", "solver=heun",
                         "schedule=karras", f"out={tmp_path / 'h'}", "progress=false")
    assert code == 2 and "schedule" in err and "dpmpp" in err
    code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", "solver=dpmpp_2m", "schedule=cosine",
                         f"out={tmp_path / 'c'}", "progress=false")
    assert code == 2 and "logsnr" in err


@pytest.mark.parametrize("model", [["model=edm"], ["model=pfgmpp", "D=128"], ["model=flow", "path=ko"], ["model=ddpm"],
                                   ["model=spd"]])
def test_training_grid_and_fid_callback_accept_it(model):
    """train.py's sample grid and FID callback take sample.solver=dpmpp_2m for every method."""
    from genflow.config import compose

    cfg = compose([*model, "sample.solver=dpmpp_2m", "sample.steps=10", "callbacks=fid"], environment=False)
    assert cfg.callbacks.fid.solver == "dpmpp_2m" and cfg.callbacks.fid.steps == 10


def test_time_grids():
    """model: the method's own grid (EDM's rho-grid, and so k-diffusion's); logsnr: equal steps of the mean
    lambda between the grid's finite ends, an infinite end kept (after alpha = 0 the finite part starts at
    sigma/alpha = 80 at least); the VP methods default to it, flow matching to karras."""
    edm, flow, ddpm = EDM(), FlowMatching("condot"), DDPM()
    torch.testing.assert_close(solvers.exponential_grid(edm, 6, "karras"), edm.time_grid(6), rtol=1e-9, atol=0)
    for m, steps, ends in ((edm, 6, (0, 6)), (flow, 7, (1, 6)), (ddpm, 7, (0, 7))):  # ends: the finite lambdas
        g = solvers.exponential_grid(m, steps, "logsnr")
        lam = solvers.mean_log_snr(m, g[ends[0]:ends[1]])
        torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(lam.numel() - 1), rtol=1e-7, atol=1e-9)
    g = solvers.exponential_grid(flow, 7, "logsnr")  # after alpha = 0 the finite part starts at EDM's sigma_max
    assert float(g[0]) == 0.0 and float(g[-1]) == 1.0 and float(g[-2]) == float(flow.time_grid(7)[-2])
    torch.testing.assert_close(solvers.mean_log_snr(flow, g[1:2]), torch.tensor([-math.log(80)], dtype=F64),
                               rtol=0, atol=1e-9)
    for solver in solvers.EXPONENTIAL_SOLVERS:
        assert ddpm.solver_options(solver) == {"schedule": "logsnr"}
        assert flow.solver_options(solver) == {"schedule": "karras"}
        assert "schedule" not in edm.solver_options(solver)


def test_rounding_level_sigma_is_the_data_end():
    """A path whose sigma(1) is cos(pi/2) = 6e-17 in float64 ends at sigma = 0: the last step is the plain
    prediction (first order), not a 2M step with h ~ 37 that extrapolates by h/(2 h_prev)."""
    check_rounding_level_sigma_is_the_data_end("dpmpp_2m")
