"""genflow.likelihood against closed forms (the instantaneous change of variables of Chen et al. 2018 and
Grathwohl et al. 2019; sigma0-perturbed likelihoods of Chae et al. 2023). Fields are exact (Gaussian data, the uniform circle) run through the real method
classes, so no training is needed; a random MLP serves as the nonlinear field where only agreement matters."""
from __future__ import annotations

import math

import pytest
import torch

from genflow.data.circle import circle_frame, circle_log_density, uniform_circle_log_density, uniform_circle_score
from genflow.errors import ConfigError
from genflow.likelihood import (add_instance_noise, divergence_exact, divergence_hutchinson, evaluate_nll,
                                gaussian_kernel, instance_noise_schedule, likelihood_solve, log_likelihood,
                                selection_metric, truncation_entropy_bpd)
from genflow.methods.ddpm import DDPM
from genflow.methods.edm import EDM
from genflow.methods.pfgmpp import PFGMPP

F64 = torch.float64


# ------------------------------------------------------------------------------------------ exact fields
class EDMGaussianNet(torch.nn.Module):
    """The raw net F whose EDM denoiser is exact for data N(mu, Sigma): D = mu + Sigma (Sigma + s^2)^-1 (x - mu)."""

    def __init__(self, method: EDM, mu: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        self.method, self.mu, self.cov = method, mu, cov

    def forward(self, xin, c_noise, cond=None):
        sigma = (4 * c_noise.to(F64)).exp()
        c_skip, c_out, c_in, _ = self.method.preconditioning(sigma[:, None])
        x = xin.to(F64) / c_in
        eye = torch.eye(self.mu.numel(), dtype=F64)
        gain = self.cov @ torch.linalg.inv(self.cov + sigma[:, None, None] ** 2 * eye)  # (B, d, d)
        den = self.mu + torch.einsum("bij,bj->bi", gain, x - self.mu)
        return ((den - c_skip * x) / c_out).to(xin.dtype)


class EDMCircleNet(torch.nn.Module):
    """Exact EDM denoiser of the uniform unit circle (Tweedie: D = x + s^2 grad log q_s), via I1/I0."""

    def __init__(self, method: EDM):
        super().__init__()
        self.method = method

    def forward(self, xin, c_noise, cond=None):
        sigma = (4 * c_noise.to(F64)).exp()
        c_skip, c_out, c_in, _ = self.method.preconditioning(sigma[:, None])
        x = xin.to(F64) / c_in
        den = x + sigma[:, None] ** 2 * uniform_circle_score(x, sigma)
        return ((den - c_skip * x) / c_out).to(xin.dtype)


class DDPMGaussianNet(torch.nn.Module):
    """Exact eps-prediction of DDPM for diagonal Gaussian data N(mu, diag(v)): E[eps | x_s]."""

    def __init__(self, method: DDPM, mu, var):
        super().__init__()
        self.method, self.mu, self.var = method, mu, var

    def forward(self, x, label, cond=None):
        s = label.to(F64)[:, None] / self.method.label_scale
        ab, omab = self.method.alpha_bar(s), self.method.one_minus_alpha_bar(s)
        return (omab.sqrt() * (x.to(F64) - ab.sqrt() * self.mu) / (ab * self.var + omab)).to(x.dtype)


def edm_gaussian_model_logp(method: EDM, mu, var, y, t0):
    """Exact model density of EDM with the exact diagonal-Gaussian field: the PF-ODE map is affine per
    coordinate, (x - mu)/sqrt(var + s^2) is constant, so log p(y) = log prior(z_T) + log|dz_T/dy|."""
    T = method.sigma_max
    ratio = ((var + T ** 2) / (var + t0 ** 2)).sqrt()
    return method.prior_log_prob(mu + (y - mu) * ratio) + ratio.log().sum()


def gauss_logpdf(y, mu, var):
    return torch.distributions.Normal(mu, var.sqrt()).log_prob(y).sum(1)


@pytest.fixture(scope="module")
def edm_gauss():
    torch.manual_seed(0)
    method = EDM(sigma_max=10.0)  # the closed form includes the prior, so a short path suffices
    mu = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    var = torch.tensor([0.25, 0.04, 0.5], dtype=F64)
    return method, EDMGaussianNet(method, mu, torch.diag(var)), mu, var


# ------------------------------------------------------------------------------ 1. Gaussian closed forms
@pytest.mark.parametrize("sigma0", [None, 0.05, 0.3])
def test_edm_gaussian_closed_form(edm_gauss, sigma0):
    method, net, mu, var = edm_gauss
    y = mu + var.sqrt() * torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    lp = log_likelihood(method, net, y, sigma0, atol=1e-7, rtol=1e-7)
    t0 = method.sigma_min if sigma0 is None else sigma0
    torch.testing.assert_close(lp, edm_gaussian_model_logp(method, mu, var, y, t0), atol=1e-5, rtol=0)


def test_edm_perturbed_matches_data_convolution():
    """Zero-mean data: the only gap to log N(y; 0, Sigma + s0^2) is the prior's variance mismatch at
    sigma_max, |gap| <= (d/2) max var / sigma_max^2 + z^2-terms ~ 1e-4 (sigma_max = 80); check to 1e-3."""
    method = EDM()
    var = torch.tensor([0.25, 0.04], dtype=F64)
    net = EDMGaussianNet(method, torch.zeros(2, dtype=F64), torch.diag(var))
    y = var.sqrt() * torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    for s0 in (0.05, 0.2):
        lp = log_likelihood(method, net, y, s0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lp, gauss_logpdf(y, torch.zeros(2, dtype=F64), var + s0 ** 2), atol=1e-3, rtol=0)


@pytest.mark.parametrize("sigma0", [None, 0.05, 0.3])
def test_ddpm_vp_gaussian_closed_form(sigma0):
    """VP: log q_s0(y) = log p_{t0}(alpha y) + d log alpha with sigma_t/alpha_t = s0; the exact model is the
    affine PF-ODE map of the prior (invariant (x - alpha mu)/sqrt(alpha^2 v + 1 - alpha^2))."""
    method = DDPM(T=1000)
    mu = torch.tensor([0.2, -0.3], dtype=F64)
    var = torch.tensor([0.09, 0.3], dtype=F64)
    net = DDPMGaussianNet(method, mu, var)
    y = mu + var.sqrt() * torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    res = likelihood_solve(method, net, y, sigma0, atol=1e-8, rtol=1e-8)
    s0, sT = res.t_start, res.t_end
    a0, aT = math.sqrt(float(method.alpha_bar(s0))), math.sqrt(float(method.alpha_bar(sT)))
    if sigma0 is not None:
        assert math.sqrt(float(method.one_minus_alpha_bar(s0))) / a0 == pytest.approx(sigma0, rel=1e-9)
    x0 = (a0 if sigma0 is not None else 1.0) * y
    v0, vT = a0 ** 2 * var + 1 - a0 ** 2, aT ** 2 * var + 1 - aT ** 2
    zT = aT * mu + (x0 - a0 * mu) * (vT / v0).sqrt()
    model = (gauss_logpdf(zT, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)) + 0.5 * (vT / v0).log().sum()
             + (2 * math.log(a0) if sigma0 is not None else 0.0))
    torch.testing.assert_close(res.log_prob, model, atol=1e-4, rtol=0)
    if sigma0 is not None:  # and to the data law itself, up to the prior mismatch alpha(s_hi) ~ 6e-3
        torch.testing.assert_close(res.log_prob, gauss_logpdf(y, mu, var + sigma0 ** 2), atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------- 6. sigma0 <-> t0
def test_sigma0_time_maps():
    assert gaussian_kernel(EDM()).time_for(0.05) == pytest.approx(0.05)
    ddpm = gaussian_kernel(DDPM(T=1000))
    t0 = ddpm.time_for(0.05)
    assert ddpm.rho(t0) == pytest.approx(0.05, rel=1e-9)
    with pytest.raises(ConfigError, match="heavy-tailed"):
        gaussian_kernel(PFGMPP(D=128))
    assert gaussian_kernel(PFGMPP(D=None)).time_for(0.1) == pytest.approx(0.1)  # D = inf is EDM
    with pytest.raises(ConfigError, match="positive"):
        log_likelihood(EDM(), lambda *a: a[0], torch.zeros(1, 2), sigma0=-0.1)


class FlowGaussianNet(torch.nn.Module):
    """Exact marginal velocity of an affine path for diagonal Gaussian data N(mu, diag(v)):
    u = alpha' E[x1 | x_t] + sigma' E[x0 | x_t] (x_t = alpha x1 + sigma x0)."""

    def __init__(self, method, mu, var):
        super().__init__()
        self.method, self.mu, self.var = method, mu, var

    def forward(self, x, t, cond=None):
        o = self.method.schedule(t.to(F64)[:, None])
        a, s, da, ds = o.alpha_t, o.sigma_t, o.d_alpha_t, o.d_sigma_t
        r = (x.to(F64) - a * self.mu) / (a ** 2 * self.var + s ** 2)
        return (da * (self.mu + a * self.var * r) + ds * s * r).to(x.dtype)


@pytest.mark.parametrize("sigma0", [None, 0.05, 0.3])
def test_condot_gaussian_closed_form(sigma0):
    """Cond-OT (sigma_min = 0): the prior is exactly N(0, I) at t = 0, so log q_s0(y) = log N(y; mu, v + s0^2)
    with no prior mismatch; t0 = 1/(1 + s0), i.e. delta = s0/(1 + s0)."""
    flow = pytest.importorskip("genflow.methods.flow")
    method = flow.FlowMatching("condot")
    mu = torch.tensor([0.4, -0.1, 0.0], dtype=F64)
    var = torch.tensor([0.2, 0.05, 0.4], dtype=F64)
    net = FlowGaussianNet(method, mu, var)
    y = mu + var.sqrt() * torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(13))
    res = likelihood_solve(method, net, y, sigma0, atol=1e-8, rtol=1e-8)
    s0 = 0.0 if sigma0 is None else sigma0
    assert 1 - res.t_start == pytest.approx(s0 / (1 + s0), abs=1e-12)
    torch.testing.assert_close(res.log_prob, gauss_logpdf(y, mu, var + s0 ** 2), atol=1e-5, rtol=0)
    if sigma0 is not None:
        hutch = [log_likelihood(method, net, y, sigma0, divergence="hutchinson", probe="gaussian",
                                generator=torch.Generator().manual_seed(k)) for k in range(16)]
        diff = torch.stack(hutch).flatten() - gauss_logpdf(y, mu, var + s0 ** 2).repeat(16)
        assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(diff.numel())


def test_flow_sigma_min_path():
    """Cond-OT with sigma_min = 0.1: the data end already holds N(0, 0.1^2) noise; sigma0 below it is
    refused, above it is found by bisection and matches the Gaussian closed form."""
    flow = pytest.importorskip("genflow.methods.flow")
    method = flow.FlowMatching("condot", sigma_min=0.1)
    mu, var = torch.tensor([0.2, -0.3], dtype=F64), torch.tensor([0.1, 0.3], dtype=F64)
    net = FlowGaussianNet(method, mu, var)
    y = mu + var.sqrt() * torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(14))
    with pytest.raises(ConfigError, match="below this path"):
        log_likelihood(method, net, y, 0.05)
    for s0 in (0.1, 0.25):
        lp = log_likelihood(method, net, y, s0, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(lp, gauss_logpdf(y, mu, var + s0 ** 2), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- 2. Hutchinson on a linear map
def _linear_field(n_dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_dim, n_dim, generator=g, dtype=F64)
    return A


def test_hutchinson_unbiased_and_variance():
    """E[e^T A e] = tr A; Var = 2(|S|_F^2 - sum S_ii^2) (Rademacher) <= 2|S|_F^2 (Gaussian), S = (A + A^T)/2;
    averaging k probes divides the variance by k. Checked with 20000 single-sample (batch 1) estimates."""
    A = _linear_field()
    S = 0.5 * (A + A.T)
    var_rad = 2 * ((S ** 2).sum() - (torch.diagonal(S) ** 2).sum())
    var_gau = 2 * (S ** 2).sum()
    x = torch.zeros(1, 4, dtype=F64, requires_grad=True)
    v = x @ A.T
    n = 20000
    g = torch.Generator().manual_seed(1)
    for kind, var in (("rademacher", var_rad), ("gaussian", var_gau)):
        for k in (1, 4):
            if kind == "rademacher":
                eps = torch.randint(0, 2, (n, k, 1, 4), generator=g).to(F64) * 2 - 1
            else:
                eps = torch.randn(n, k, 1, 4, generator=g, dtype=F64)
            # batched: est_j = mean_k eps_jk^T A eps_jk (the same formula divergence_hutchinson applies)
            est = torch.stack([divergence_hutchinson(v, x, eps[j]) for j in range(200)]).flatten()
            full = torch.einsum("nkbi,ij,nkbj->nb", eps, A, eps).flatten() / k
            torch.testing.assert_close(est, full[:200])
            se = math.sqrt(float(var) / k / n)
            assert abs(float(full.mean()) - float(torch.trace(A))) < 4 * se
            # sample variance of a variance estimate: relative s.e. ~ sqrt(2/n) * kurtosis factor; 10% is > 5 s.e.
            assert float(full.var()) == pytest.approx(float(var) / k, rel=0.1)
    assert var_rad <= var_gau
    assert float(divergence_exact(v, x)) == pytest.approx(float(torch.trace(A)))


def test_hutchinson_probe_fixed_within_solve(edm_gauss):
    """EDM with a non-diagonal Gaussian: the Jacobian of the velocity is s (Sigma + s^2 I)^-1, so with a
    fixed probe e the divergence integral is exactly (1/2) e^T [log(Sigma + s^2 I)]_{t0}^{T} e (matrix log).
    A probe redrawn per step would not give this quadratic form; the seeded generator reproduces it."""
    method = EDM(sigma_max=5.0)
    cov = torch.tensor([[0.3, 0.12, 0.0], [0.12, 0.2, -0.08], [0.0, -0.08, 0.25]], dtype=F64)
    net = EDMGaussianNet(method, torch.zeros(3, dtype=F64), cov)
    y = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(4)) * 0.4
    res = likelihood_solve(method, net, y, 0.1, divergence="hutchinson", generator=torch.Generator().manual_seed(9),
                           atol=1e-8, rtol=1e-8)
    eps = torch.randint(0, 2, (1, 4, 3), generator=torch.Generator().manual_seed(9)).to(F64) * 2 - 1

    def logm(s):
        w, U = torch.linalg.eigh(cov + s ** 2 * torch.eye(3, dtype=F64))
        return U @ torch.diag(w.log()) @ U.T

    L = 0.5 * (logm(method.sigma_max) - logm(0.1))
    torch.testing.assert_close(res.delta, torch.einsum("bi,ij,bj->b", eps[0], L, eps[0]), atol=1e-6, rtol=0)
    again = likelihood_solve(method, net, y, 0.1, divergence="hutchinson", generator=torch.Generator().manual_seed(9),
                             atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(res.log_prob, again.log_prob, atol=0, rtol=0)
    # each sample has its own probe: 256 copies of one point average to the exact answer within 4 s.e.
    many = likelihood_solve(method, net, y[:1].expand(256, 3).contiguous(), 0.1, divergence="hutchinson",
                            generator=torch.Generator().manual_seed(10), solver="rk4", steps=32)
    exact = float(torch.trace(L))
    assert abs(float(many.delta.mean()) - exact) < 4 * float(many.delta.std()) / math.sqrt(256) + 1e-3
    assert float(many.delta.std()) > 0


# ------------------------------------------------------------------ 3./4./5. nonlinear field: agreement
@pytest.fixture(scope="module")
def random_mlp_edm():
    from genflow.nets.mlp import MLP

    torch.manual_seed(0)
    net = MLP(data_shape=(2,), hidden=32, num_blocks=1, emb_channels=16)
    with torch.no_grad():  # the output layer starts near zero; make the field visibly nonlinear
        net.out.weight.normal_(0, 0.5)
        for blk in net.blocks:
            blk.fc1.weight.normal_(0, 0.3)
    return EDM(sigma_max=2.0), net.double()  # float64 end to end: tight tolerances are reachable


def test_exact_vs_hutchinson_agree(random_mlp_edm):
    method, net = random_mlp_edm
    # the same fixed-step discretisation for both, so the difference is the divergence estimator alone
    y = torch.randn(128, 2, generator=torch.Generator().manual_seed(5), dtype=F64) * 0.5
    exact = log_likelihood(method, net, y, 0.1, solver="rk4", steps=16)
    hutch = log_likelihood(method, net, y, 0.1, divergence="hutchinson", generator=torch.Generator().manual_seed(6),
                           solver="rk4", steps=16)
    diff = hutch - exact
    assert float(diff.abs().max()) > 1e-3  # the estimator is noisy per sample ...
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(128)  # ... and unbiased


def test_forward_equals_backward(random_mlp_edm):
    """Sample forward with the project's solver (prior -> data), then the likelihood solve must return to
    the same prior point, and log p(x) must equal log prior(z) - int div along the *sampling* direction,
    integrated here independently with the opposite sign convention."""
    from torchdiffeq import odeint

    method, net = random_mlp_edm
    z = method.prior_sample((8, 2), generator=torch.Generator().manual_seed(7)).to(F64)
    s0 = 0.3

    def rhs(t, state):
        x = state[0].detach().requires_grad_(True)
        with torch.enable_grad():
            v = method.velocity(net, x, t)
            div = divergence_exact(v, x)
        return v.detach(), -div.detach()

    xs, logp = (s[-1] for s in odeint(rhs, (z, method.prior_log_prob(z)),
                                      torch.tensor([method.sigma_max, s0], dtype=F64), atol=1e-5, rtol=1e-5))
    res = likelihood_solve(method, net, xs, s0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.z, z, atol=1e-3, rtol=0)
    torch.testing.assert_close(res.log_prob, logp, atol=1e-3, rtol=0)


def test_gradients_flow_and_mle_step(random_mlp_edm):
    import copy

    method, net0 = random_mlp_edm
    net = copy.deepcopy(net0)
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(8), dtype=F64) * 0.5
    no_grad = log_likelihood(method, net, y, 0.1, solver="rk4", steps=8)
    assert no_grad.grad_fn is None
    nll = -log_likelihood(method, net, y, 0.1, solver="rk4", steps=8, enable_grad=True).mean()
    nll.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    with torch.no_grad():  # a small normalised gradient step must lower the NLL of this batch
        for p in net.parameters():
            p -= 1e-3 * p.grad / norm
    after = -log_likelihood(method, net, y, 0.1, solver="rk4", steps=8).mean()
    assert float(after) < float(nll.detach())


# --------------------------------------------------------------------------------- 7. circle reference
def test_circle_bessel_equals_quadrature():
    y = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.7
    for s in (0.05, 0.3):
        torch.testing.assert_close(circle_log_density(y, s, a=1.0, b=1.0, nodes=4096),
                                   uniform_circle_log_density(y, s), atol=1e-8, rtol=0)


def test_circle_exact_field_perturbed_likelihood():
    """EDM with the exact uniform-circle denoiser in R^3: the sigma0 = 0.05 likelihood matches the Bessel
    formula; the gap is the prior mismatch at sigma_max (~1/(2 sigma_max^2)) plus solver error."""
    method = EDM(sigma_max=40.0)
    net = EDMCircleNet(method)
    g = torch.Generator().manual_seed(11)
    theta = torch.rand(32, generator=g, dtype=F64) * 2 * math.pi
    x = torch.stack([theta.cos(), theta.sin()], 1) @ circle_frame(3).T
    y = add_instance_noise(x, 0.05, g)
    lp = log_likelihood(method, net, y, 0.05, atol=1e-7, rtol=1e-7)
    gap = uniform_circle_log_density(y, 0.05) - lp
    assert float(gap.abs().max()) < 2e-3
    with pytest.raises(ConfigError):
        log_likelihood(PFGMPP(D=64), net, y, 0.05)


# --------------------------------------------------------------------------- 8.-13. evaluation helpers
def _images(scale_lo, scale_hi, n=64, seed=0):
    ints = torch.randint(100, 156, (n, 1, 2, 2), generator=torch.Generator().manual_seed(seed)).to(F64)
    return scale_lo + (scale_hi - scale_lo) * ints / 255


def test_bpd_offsets_agree_between_conventions():
    """bpd = -E log p(y)/(D ln 2) - log2(hi - lo) + 8 on uniformly dequantized 8-bit data, checked against the
    closed-form model density on the same dequantization draws, in [-1, 1] (+7) and [0, 1] (+8). The same
    Gaussian law written in both conventions has identical bits/dim: the offsets compensate the scaling."""
    true_bpd = {}
    for lo, hi in ((-1.0, 1.0), (0.0, 1.0)):
        s = hi - lo
        method = EDM(sigma_min=0.002 * s, sigma_max=10.0 * s)
        mu = torch.full((4,), lo + s * 0.5, dtype=F64)
        var = torch.full((4,), (0.05 * s) ** 2, dtype=F64)
        net = EDMGaussianNet(method, mu, torch.diag(var))
        x = _images(lo, hi, n=32).reshape(32, 4)
        res = evaluate_nll(method, net, x, data_range=(lo, hi), bits=8, importance_samples=1, divergence="exact",
                           atol=1e-7, rtol=1e-7, seed=3, progress=False)
        u = torch.rand(32, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
        ints = ((x - lo) / s * 255).round()
        y = lo + s * (ints + u) / 256
        lp = edm_gaussian_model_logp(method, mu, var, y, method.sigma_min)
        offset = 7.0 if lo == -1.0 else 8.0
        assert res["bpd"] == pytest.approx(float((-lp / (4 * math.log(2))).mean()) + offset, abs=1e-5)
        assert set(res) >= {"bpd", "nll", "bpd_se", "nfe", "s_per_image", "num_samples", "importance_samples"}
        true_bpd[lo] = float((-gauss_logpdf(y, mu, var + method.sigma_min ** 2) / (4 * math.log(2))).mean()) + offset
    assert true_bpd[-1.0] == pytest.approx(true_bpd[0.0], abs=1e-9)
    with pytest.raises(ConfigError, match="not 256-level"):
        evaluate_nll(EDM(), None, x + 1e-2, data_range=(0.0, 1.0), progress=False)


def test_importance_weighting_tightens_bound():
    """K-sample importance-weighted dequantization: E[bpd_K] is non-increasing in K. With a sharp model
    (std ~ 1.3 grey levels) the density varies inside a bin, so the gain is visible. The expectations
    over dequantization draws come from the closed-form model density (400 replications); each
    ``evaluate_nll`` run is one replication and must fall within 4 of their standard deviations."""
    method = EDM(sigma_max=1.0)
    mu = torch.zeros(2, dtype=F64)
    var = torch.full((2,), 0.01 ** 2, dtype=F64)
    net = EDMGaussianNet(method, mu, torch.diag(var))
    ints = torch.randint(126, 130, (48, 2), generator=torch.Generator().manual_seed(1)).to(F64)
    x = -1 + 2 * ints / 255
    kw = dict(data_range=(-1.0, 1.0), divergence="exact", atol=1e-6, rtol=1e-6, progress=False, seed=5)
    got = {k: evaluate_nll(method, net, x, importance_samples=k, **kw)["bpd"] for k in (1, 8)}
    g = torch.Generator().manual_seed(0)
    for k in (1, 8):
        u = torch.rand(400, k, 48, 2, generator=g, dtype=F64)
        lp = edm_gaussian_model_logp(method, mu, var, (-1 + 2 * (ints + u) / 256).reshape(-1, 2), method.sigma_min)
        bound = torch.logsumexp(lp.reshape(400, k, 48), 1) - math.log(k) + 2 * math.log(2) - 2 * 8 * math.log(2)
        reps = (-bound / (2 * math.log(2))).mean(1)  # bpd of each replication
        got[f"mean{k}"], got[f"sd{k}"] = float(reps.mean()), float(reps.std())
        assert abs(got[k] - got[f"mean{k}"]) < 4 * got[f"sd{k}"]
    assert got["mean8"] < got["mean1"] - 4 * (got["sd1"] + got["sd8"]) / math.sqrt(400)
    assert got[8] < got[1]


def test_perturbed_metric_named_and_reproducible(edm_gauss):
    method, net, mu, var = edm_gauss
    x = mu + var.sqrt() * torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(12))
    kw = dict(sigma0=0.05, bits=None, divergence="exact", progress=False, atol=1e-7, rtol=1e-7)
    r1 = evaluate_nll(method, net, x, **kw)
    r2 = evaluate_nll(method, net, x, batch_size=5, **kw)
    assert "bpd_perturbed" in r1 and "nll_perturbed" in r1 and r1["sigma0"] == 0.05 and "bpd" not in r1
    # noise fixed by seed, independent of batching (only the adaptive solver's shared step size differs)
    assert r1["bpd_perturbed"] == pytest.approx(r2["bpd_perturbed"], abs=1e-5)
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = -float(edm_gaussian_model_logp(method, mu, var, y, 0.05).mean())
    assert r1["nll_perturbed"] == pytest.approx(ref, abs=1e-4)


def test_selection_never_uses_clean_continuous_likelihood():
    assert selection_metric(quantized=False, sigma0=0.05) == "bpd_perturbed"
    assert selection_metric(quantized=True, sigma0=None) == "bpd"
    with pytest.raises(ConfigError, match="clean likelihood"):
        selection_metric(quantized=False, sigma0=None)


def test_truncation_entropy_constant():
    """score_sde's VP at eps = 1e-5 has sigma ~ 1e-3: its Gaussian entropy is -7.92 bits/dim (research 2.3);
    DDPM with T = 1e5 starts its clean likelihood at s = 1/T = 1e-5."""
    assert truncation_entropy_bpd(DDPM(T=100_000)) == pytest.approx(-7.92, abs=0.01)
    assert truncation_entropy_bpd(EDM()) == pytest.approx(0.5 * math.log2(2 * math.pi * math.e) + math.log2(0.002))


def test_instance_noise_helpers():
    x = torch.zeros(1000, 3)
    assert add_instance_noise(x, 0.0) is x
    a, b = add_instance_noise(x, 0.1), add_instance_noise(x, 0.1)
    assert not torch.equal(a, b)  # fresh every call (every minibatch)
    assert float(a.std()) == pytest.approx(0.1, rel=0.05)
    vals = [instance_noise_schedule(n, c=0.5, gamma=1 / 3) for n in (100, 1000, 10000)]
    assert vals[0] > vals[1] > vals[2] and vals[1] == pytest.approx(0.05)
    with pytest.raises(ConfigError):
        instance_noise_schedule(0)


# ------------------------------------------------------------------ maximum-likelihood gradients ----------
class LinearNet(torch.nn.Module):
    """F(x) = w x: one parameter, so d log p / dw is checkable by a central finite difference."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=F64))

    def forward(self, x, label, cond=None):
        return self.w * x


def _gradient_methods():
    from genflow.methods import FlowMatching, SPD
    from genflow.methods.spd import power_law_spectrum

    return {"edm": EDM(sigma_max=5.0), "pfgmpp_D8": PFGMPP(D=8, sigma_max=5.0), "ddpm": DDPM(T=100),
            "spd": SPD(power_law_spectrum(1.59, 0.5, 2.0, 4, 4), T=100), "flow": FlowMatching("condot")}


@pytest.mark.parametrize("name", ["edm", "pfgmpp_D8", "ddpm", "spd", "flow"])
def test_likelihood_gradient_equals_finite_difference(name):
    """d log p / dw through the whole solve, prior term included (it once detached x: EDM's gradient was
    -6.07 where the finite difference gives -4.94)."""
    method = _gradient_methods()[name]
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.5
    net = LinearNet(0.3)

    def logp(w=None):
        if w is not None:
            net.w.data.fill_(w)
        return log_likelihood(method, net, x, solver="rk4", steps=3, enable_grad=w is None).sum()

    net.w.grad = None
    logp().backward()
    grad = float(net.w.grad)
    h = 1e-5
    with torch.no_grad():
        fd = (float(logp(0.3 + h)) - float(logp(0.3 - h))) / (2 * h)
    assert abs(grad - fd) < 1e-3 * abs(fd), (grad, fd)


@pytest.mark.parametrize("name", ["edm", "pfgmpp_D8", "ddpm", "spd", "flow"])
def test_prior_log_prob_is_float64_per_sample_from_float32_input(name):
    """The protocol's contract: (B,) float64 whatever x's dtype (a float32 sum over many pixels loses digits)."""
    method = _gradient_methods()[name]
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    logp = method.prior_log_prob(x)
    assert logp.shape == (3,) and logp.dtype == F64
    torch.testing.assert_close(logp, method.prior_log_prob(x.to(F64)), rtol=1e-7, atol=0)
