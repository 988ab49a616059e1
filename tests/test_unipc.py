"""UniPC against mathematics: on data whose denoiser is known in closed form the global error of
``solver=unipc`` with predictor order p and the corrector falls at order p + 1 as the steps double, for every
method's Gaussian path (EDM, PFGM++ at D = 8, 128, inf, flow matching on each path, DDPM, SPD per frequency);
and it equals the authors' own implementation (``uni_pc.py`` of Zhao et al.'s repository, when UNIPC_DIR
points at it) step for step."""
import contextlib
import importlib.util
import io
import math
import os

import pytest
import torch

from genflow import solvers
from genflow.methods import DDPM, EDM, PFGMPP, SPD, FlowMatching
from solver_cases import (F64, PATHS, DDPMNet, EDMNet, FlowNet, SPDNet, assert_order, check_guidance_and_nfe,
                          check_rounding_level_sigma_is_the_data_end, gaussian_denoiser, gaussian_flow, gens,
                          lambda_uniform, orders, pfgmpp_denoiser, solve_errors, spectrum)

#: the doublings that show the asymptotic order: UniPC's first steps are of lower order (UniC-1, then
#: UniC-2), whose error is one order lower and dominates below these step counts at p = 3
STEPS = {1: (32, 64, 128), 2: (32, 64, 128), 3: (128, 256, 512)}


# ------------------------------------------------------------------------------------------- orders
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_edm_gaussian_order_p_plus_one(order, variant):
    """EDM, Gaussian data, sigma_max -> sigma_min on the rho-grid (32 -> 64 -> 128 steps; p = 1: 2.13, 2.07 /
    1.96, 1.99 for bh1 / bh2; p = 2: 3.18, 3.09 / 3.04, 3.02; p = 3: 3.99, 4.01 for both) and, for p <= 2,
    uniform in lambda."""
    m = EDM()
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    exact = lambda g: gaussian_flow(m, x0, g)
    net = EDMNet(m, gaussian_denoiser)
    steps = (32, 64, 128)
    assert_order(solve_errors("unipc", m, net, x0, [m.time_grid(n + 1)[:-1] for n in steps], exact, order=order,
                              variant=variant), order + 1)
    if order < 3:
        grids = [lambda_uniform(m, m.sigma_max, m.sigma_min, n) for n in steps]
        assert_order(solve_errors("unipc", m, net, x0, grids, exact, order=order, variant=variant), order + 1)


def test_edm_lambda_uniform_third_order_start():
    """Uniform in lambda the first steps' lower order shows: p = 3 measures 2.57, 3.62 over 32 -> 128 steps
    and 3.85, 3.93 over 128 -> 512 (the asymptote, 4)."""
    m = EDM()
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    grids = [lambda_uniform(m, m.sigma_max, m.sigma_min, n) for n in STEPS[3]]
    errors = solve_errors("unipc", m, EDMNet(m, gaussian_denoiser), x0, grids, lambda g: gaussian_flow(m, x0, g),
                          order=3)
    assert_order(errors, 4)


@pytest.mark.parametrize("D", [8, 128, math.inf])
def test_pfgmpp_order_at_every_D(D):
    """PFGM++'s three-point data under the exact D-kernel posterior, against dopri5 at 1e-13 on the closed-form
    field (64 -> 128 -> 256 steps uniform in lambda). p = 1: 1.90, 1.95 / 1.86, 1.93 / 1.85, 1.93 at D = 8 /
    128 / inf; p = 2: 2.93, 2.98 / 2.87, 2.98 / 2.86, 2.98. p = 3 falls faster than order 4 over this range
    (5.56, 4.15 / 5.33, 4.75 / 5.26, 4.81; at 512 steps the error, ~4e-9, meets the reference's): at least
    order 3.7 is asserted."""
    m = PFGMPP(D=D, sigma_max=10.0, sigma_min=0.02)
    net = EDMNet(m, pfgmpp_denoiser(D))
    x0 = m.prior_sample((6, 4), generator=gens(6)).to(F64)
    ends = torch.tensor([m.sigma_max, m.sigma_min], dtype=F64)
    ref = solvers.integrate(lambda x, t: m.velocity(net, x, t), x0, ends, solver="dopri5", atol=1e-13,
                            rtol=1e-13).x
    grids = [lambda_uniform(m, m.sigma_max, m.sigma_min, n) for n in (64, 128, 256)]
    for order in (1, 2):
        assert_order(solve_errors("unipc", m, net, x0, grids, lambda g: ref, order=order), order + 1)
    assert all(p >= 3.7 for p in orders(solve_errors("unipc", m, net, x0, grids, lambda g: ref, order=3)))


@pytest.mark.parametrize("path", list(PATHS))
def test_flow_matching_order_on_every_path(path):
    """Each affine path, t = 0.02 -> 0.98 uniform in lambda, against the Gaussian map: p = 1, 2 over 32 -> 128
    steps (1.98-2.00, 2.97-3.00), p = 3 over 128 -> 512 (3.90-3.97; KO over 64 -> 256, 3.93, 3.94: its path is
    tabulated and its error meets that rounding, ~1e-9, at 512 steps)."""
    spec = PATHS[path]
    m = FlowMatching(spec if isinstance(spec, str) else spec())
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    for order in (1, 2, 3):
        steps = (64, 128, 256) if path == "ko" and order == 3 else STEPS[order]
        grids = [lambda_uniform(m, 0.02, 0.98, n) for n in steps]
        assert_order(solve_errors("unipc", m, FlowNet(m), x0, grids, lambda g: gaussian_flow(m, x0, g), order=order),
                     order + 1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_order(schedule):
    """s_hi -> s_lo uniform in lambda: 1.99, 2.00 / 2.99, 3.00 / 3.85, 3.78 (linear; cosine alike)."""
    m = DDPM(schedule=schedule, T=1000)
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    for order in (1, 2, 3):
        grids = [lambda_uniform(m, m.s_hi, m.s_lo, n) for n in STEPS[order]]
        assert_order(solve_errors("unipc", m, DDPMNet(m), x0, grids, lambda g: gaussian_flow(m, x0, g), order=order),
                     order + 1)


def test_spd_order_per_frequency():
    """Every frequency on its own lambda_k (the coefficients, the differences' ratios r_k and UniPC's linear
    systems are per frequency): 1.99, 2.00 / 2.98, 2.99 over 32 -> 128 steps, 3.81, 3.90 over 64 -> 256."""
    m = SPD(spectrum(), T=1000)
    x0 = m.prior_sample((4, 1, 8, 8), generator=gens(4)).to(F64)

    def exact(grid):
        return m.combine((x0, (m.marginal_variance(grid[-1]) / m.marginal_variance(grid[0])).sqrt()))

    for order in (1, 2, 3):
        grids = [lambda_uniform(m, m.s_hi, m.s_lo, n) for n in ((64, 128, 256) if order == 3 else STEPS[order])]
        assert_order(solve_errors("unipc", m, SPDNet(m), x0, grids, exact, order=order), order + 1)


def test_flow_matching_whole_path_converges():
    """From alpha = 0 (lambda = -inf) to sigma = 0 (+inf) on the log-SNR grid: the first step is first order
    and starts the differences afresh, the last is the prediction at the last finite point; the error falls
    (at order ~1.5-2: the end steps do not shrink in lambda as fast) and is small."""
    m = FlowMatching("condot")
    x0 = m.prior_sample((8, 4), generator=gens(8)).to(F64)
    errors = []
    for n in (32, 64, 128):
        grid = solvers.exponential_grid(m, n, "logsnr")
        out = m.solve(FlowNet(m), x0, steps=n, solver="unipc", schedule="logsnr")
        assert out.nfe == n and bool(torch.isfinite(out.x).all())
        errors.append(float((out.x - gaussian_flow(m, x0, grid)).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[-1] < 2e-3, errors


# ---------------------------------------------------------------------------------------- contract
def test_nfe_is_steps_and_guidance_mixes_predictions():
    check_guidance_and_nfe("unipc")


def test_settings_are_checked():
    from genflow.errors import ConfigError

    m, net, x = EDM(), (lambda x, c, cond=None: 0 * x), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="order"):
        m.solve(net, x, steps=4, solver="unipc", order=4)
    with pytest.raises(ValueError, match="variant"):
        m.solve(net, x, steps=4, solver="unipc", variant="bh3")
    with pytest.raises(ConfigError, match="order given for solver=dpmpp_2m"):
        m.solve(net, x, steps=4, solver="dpmpp_2m", order=2)


def test_rounding_level_sigma_is_the_data_end():
    """A path whose sigma(1) is cos(pi/2) = 6e-17 ends at sigma = 0 (infinite lambda) for UniPC as well."""
    check_rounding_level_sigma_is_the_data_end("unipc")


# ------------------------------------------------------------------------- the authors' code, side by side
def _authors_unipc():
    root = os.environ.get("UNIPC_DIR")
    if not root:
        pytest.skip("UNIPC_DIR (a checkout of github.com/wl-zhao/UniPC) is unset")
    spec = importlib.util.spec_from_file_location("authors_uni_pc", os.path.join(root, "uni_pc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EDMSchedule:
    """EDM's path in the authors' noise-schedule interface: time t = sigma, alpha = 1, lambda = -ln sigma."""

    def marginal_log_mean_coeff(self, t):
        return torch.zeros_like(t)

    def marginal_alpha(self, t):
        return torch.ones_like(t)

    def marginal_std(self, t):
        return t

    def marginal_lambda(self, t):
        return -t.log()


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_equals_the_authors_unipc(order, variant):
    """EDM with Gaussian data on its rho-grid from sigma_max to sigma_min: the authors' ``UniPC.sample``
    (multistep, data prediction, their noise-prediction wrapper inverted) on the same times equals
    ``solver=unipc`` to float64 rounding, with the final steps' lower order (their ``lower_order_final``, which
    genflow applies below 15 steps: at 20 steps both keep the order) and with the grid ending at sigma = 0, which
    is their ``denoise_to_zero`` after one step fewer. Their code runs in float64 (default dtype, restored)."""
    uni_pc = _authors_unipc()
    m = EDM(sigma_max=40.0, sigma_min=0.01, rho=5.0)
    net = EDMNet(m, gaussian_denoiser)

    def noise_model(x, sigma):  # their model returns the noise prediction; x0 = x - sigma eps is D
        flat = x.reshape(x.shape[0], -1)
        return ((flat - m.denoise(net, flat, sigma)) / sigma[:, None]).reshape(x.shape)

    x0 = m.prior_sample((5, 4), generator=gens(5)).to(F64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # their coefficient vectors are built with torch.tensor(python floats)
    try:
        for steps, lower in ((3, True), (5, True), (10, True), (10, False), (20, True)):
            if steps < order:
                continue
            grid = m.time_grid(steps + 1)[:-1]  # sigma_max .. sigma_min: steps steps
            for zero in (False, True):
                theirs_solver = uni_pc.UniPC(noise_model, EDMSchedule(), algorithm_type="data_prediction",
                                             variant=variant)
                theirs_solver.get_time_steps = lambda skip_type, t_T, t_0, N, device: grid
                with contextlib.redirect_stdout(io.StringIO()):  # it prints every step
                    theirs = theirs_solver.sample(x0.reshape(5, 1, 2, 2), steps=steps, t_start=float(grid[0]),
                                                  t_end=float(grid[-1]), order=order, denoise_to_zero=zero,
                                                  lower_order_final=lower and steps < 15).reshape(5, 4)
                ours_grid = torch.cat([grid, grid.new_zeros(1)]) if zero else grid
                ours = m.solve(net, x0, steps=ours_grid.numel() - 1, solver="unipc", grid=ours_grid, order=order,
                               variant=variant, lower_order_final=lower)
                assert ours.nfe == steps + zero
                torch.testing.assert_close(ours.x, theirs, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_default_dtype(default)


# ----------------------------------------------------------------------------- everywhere a solver is named
def test_likelihood_refuses_it():
    from genflow.errors import ConfigError
    from genflow.likelihood import log_likelihood

    with pytest.raises(ConfigError, match="not an ODE integrator of the joint state"):
        log_likelihood(EDM(), lambda *a: a[0], torch.zeros(1, 2), solver="unipc")


def test_sample_and_evaluate_command_lines(cli, trained_ckpt, tmp_path):
    """sample.py draws with solver=unipc and its settings (NFE = steps); a UniPC setting for another solver is
    refused before the work, as is a bad value; evaluate refuses unipc as the likelihood's solver."""
    import json

    code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", "seeds=0-1", "steps=4", "solver=unipc", "order=2",
                         "variant=bh1", "schedule=logsnr", "guidance=2", f"out={tmp_path / 's'}", "progress=false")
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["solver"] == "unipc" and line["nfe"] == 4
    code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", "seeds=0-1", "steps=4", "solver=dpmpp_2m", "order=2",
                         f"out={tmp_path / 'd'}", "progress=false")
    assert code == 2 and "order" in err and "unipc" in err
    code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", "solver=unipc", "order=5", f"out={tmp_path / 'o'}",
                         "progress=false")
    assert code == 2 and "order" in err
    code, out, err = cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", "fid.num=0", "nll=true", "nll_solver=unipc")
    assert code == 2 and "not an ODE integrator" in err


def test_training_grid_fid_callback_and_leaderboard_rows_accept_it():
    from omegaconf import OmegaConf

    from genflow.config import SAMPLER_SCHEMA, check_schema, compose, sampler_options

    cfg = compose(["model=spd", "sample.solver=unipc", "sample.steps=10", "callbacks=fid"], environment=False)
    assert cfg.callbacks.fid.solver == "unipc" and cfg.callbacks.fid.steps == 10
    row = OmegaConf.create({"solver": "unipc", "order": 2, "variant": "bh1", "lower_order_final": False})
    check_schema(OmegaConf.create({k: row[k] for k in SAMPLER_SCHEMA if k in row}), SAMPLER_SCHEMA,
                 app="leaderboard", open_keys=())
    assert sampler_options(row) == {"order": 2, "variant": "bh1", "lower_order_final": False}
