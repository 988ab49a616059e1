"""Isotropic DDPM baseline (linear / cosine schedules) on the shared VP machinery: closed forms against
independent formulas, the oracle samplers on Gaussian data, and errors."""
from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

from genflow.errors import CheckpointError, ConfigError
from genflow.methods import DDPM

F64 = torch.float64
mp.mp.dps = 40


def ho_linear_alpha_bar(T: int = 1000) -> torch.Tensor:
    """Ho et al.'s discrete schedule: betas linspace(1e-4, 0.02, T), abar_t = prod (1 - beta)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=F64), 0)


def test_linear_schedule_closed_form_and_ho_limit():
    d = DDPM("linear", T=1000)
    s = torch.linspace(0, 1, 101, dtype=F64)
    want = torch.tensor([math.exp(-(0.1 * t + 0.5 * 19.9 * t * t)) for t in s.tolist()], dtype=F64)
    assert torch.allclose(d.alpha_bar(s), want, rtol=1e-14)
    assert torch.allclose(d.alpha_bar(s) + d.one_minus_alpha_bar(s), torch.ones_like(s), atol=1e-15)
    # 1 - abar at tiny s keeps relative precision (mpmath reference)
    assert float(d.one_minus_alpha_bar(1e-12)) == pytest.approx(float(-mp.expm1(-mp.mpf("0.1") * mp.mpf(1e-12)
                                                                              - mp.mpf("9.95") * mp.mpf(1e-24))), rel=1e-13)
    # continuous time with b0 = 0.1, b1 = 20 is the T -> inf limit of Ho's 1e-4..0.02: compare at T = 1000
    ho = ho_linear_alpha_bar()
    t = torch.arange(1, 1001, dtype=F64) / 1000
    # -ln(1 - beta) = beta + beta^2/2 + ...: the logs differ by about sum(beta^2)/2 = 0.067 at t = T
    second_order = 0.5 * torch.linspace(1e-4, 0.02, 1000, dtype=F64).square().sum()
    gap = (ho.log() - d.alpha_bar(t).log()).abs().max()
    assert float(gap) < 1.1 * float(second_order)
    assert (d.alpha_bar(t) - ho).abs().max() < 2e-3


def test_cosine_schedule_matches_nichol_dhariwal():
    d = DDPM("cosine", T=1000)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    s = torch.linspace(0, 0.999, 50, dtype=F64)
    want = torch.tensor([f(t) / f(0) for t in s.tolist()], dtype=F64)
    assert torch.allclose(d.alpha_bar(s), want, rtol=1e-12)
    assert torch.allclose(d.one_minus_alpha_bar(s), 1 - want, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_rate_is_minus_dlog_alpha_bar_and_tables_are_consistent(schedule):
    d = DDPM(schedule, T=1000)
    s = torch.linspace(0.01, 0.98, 40, dtype=F64)
    h = 1e-6
    fd = -(d.alpha_bar(s + h).log() - d.alpha_bar(s - h).log()) / (2 * h)
    assert torch.allclose(d.rate(s), fd, rtol=1e-7)
    assert torch.isfinite(d.betas).all() and (d.betas > 0).all() and (d.betas < 1).all()
    rebuilt = torch.cumprod(1 - d.betas, 0)
    assert ((rebuilt - d.alphas_cumprod).abs() / d.alphas_cumprod).max() < 1e-10
    assert torch.allclose(d.alphas_cumprod, d.alpha_bar(d.grid_times()), rtol=1e-12)


class GaussianOracle:
    """Posterior-mean eps for x0 ~ N(0, v I): eps_hat = sqrt(1 - abar) x / (abar v + 1 - abar)."""

    def __init__(self, method: DDPM, v: float):
        self.method, self.v = method, v

    def __call__(self, x, label, cond=None):
        s = label.to(F64) / 1000
        # an independent closed form (not the method's) for the linear schedule
        ab = torch.exp(-(0.1 * s + 0.5 * 19.9 * s * s)).reshape(-1, *[1] * (x.ndim - 1))
        return ((1 - ab).sqrt() * x.to(F64) / (ab * self.v + 1 - ab)).to(x.dtype)


def test_oracle_ancestral_sampler_reproduces_variance():
    d, v, n, dim = DDPM("linear", T=1000), 0.25, 2000, 8
    gen = torch.Generator().manual_seed(0)
    x = d.sample(GaussianOracle(d, v), d.prior_sample((n, dim), generator=gen), steps=1000, solver="ancestral",
                 generator=gen)
    var = x.to(F64).square().mean()
    se = v * math.sqrt(2 / (n * dim))
    assert abs(float(var) - v) < 4 * se + 0.01 * v               # 1% allowance for the T-step discretisation
    assert abs(float(x.to(F64).mean())) < 4 * math.sqrt(v / (n * dim))


def test_probability_flow_ode_is_exact_on_gaussian_data():
    d, v = DDPM("linear", T=1000), 0.25
    noise = d.prior_sample((16, 4), generator=torch.Generator().manual_seed(1)).to(F64)
    lam = lambda s: float(d.alpha_bar(s)) * v + float(d.one_minus_alpha_bar(s))
    exact = noise * math.sqrt(lam(d.s_lo) / lam(d.s_hi))
    x = d.sample(GaussianOracle(d, v), noise, steps=1, solver="dopri5")
    assert (x - exact).abs().max() < 1e-4 * exact.abs().max()
    x = d.sample(GaussianOracle(d, v), noise, steps=100, solver="heun")
    assert (x - exact).abs().max() < 5e-3 * exact.abs().max()


def test_oracle_loss_matches_closed_form():
    d, v, n, s = DDPM("linear", T=1000), 0.25, 4000, 0.3
    x0 = math.sqrt(v) * torch.randn(n, 6, generator=torch.Generator().manual_seed(2))
    per = d.loss(GaussianOracle(d, v), x0, s=s, noise=torch.randn(n, 6, generator=torch.Generator().manual_seed(3)))
    ab = float(d.alpha_bar(s))
    expected = 6 * ab * v / (ab * v + 1 - ab)
    assert abs(float(per.to(F64).mean()) - expected) < 4 * float(per.to(F64).std()) / math.sqrt(n)


def test_prior_and_images():
    d = DDPM("cosine", T=100)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(d.prior_log_prob(x), ref, rtol=1e-12)
    net = lambda x, label, cond=None: 0.1 * x
    for solver, steps in (("ancestral", 100), ("ancestral", 7), ("euler", 5), ("heun", 3)):
        out = d.sample(net, d.prior_sample((2, 1, 4, 4)), steps=steps, solver=solver)
        assert out.shape == (2, 1, 4, 4) and torch.isfinite(out).all()


def test_errors():
    with pytest.raises(ConfigError, match="schedule"):
        DDPM("quadratic")
    with pytest.raises(ConfigError, match="too small"):
        DDPM(T=1)
    with pytest.raises(ConfigError, match="beta_min"):
        DDPM(beta_min=5.0, beta_max=1.0)
    d = DDPM(T=50)
    with pytest.raises(ConfigError, match="steps"):
        d.sample(lambda x, l, c=None: x, torch.zeros(1, 2), steps=51, solver="ancestral")
    with pytest.raises(CheckpointError, match="T=50"):
        DDPM(T=60).load_state_dict(d.state_dict())
    DDPM(T=50).load_state_dict(d.state_dict())
