"""PFGM++ (Xu et al. 2023) kernel, prior and sampler against closed forms.

The kernel's radial law R^2/r^2 ~ BetaPrime(N/2, D/2) (r = sigma sqrt(D)) is checked with scipy; every
statistical tolerance is a multiple of the statistic's own standard error, and each test also shows
that the same check rejects the nearest wrong law.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from genflow.errors import ConfigError
from genflow.methods import EDM, PFGMPP
from genflow.methods.pfgmpp import sample_gamma

P_OK = 1e-3  # KS / chi-square acceptance level at fixed seeds


def gens(seeds):
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def noise_sqnorm(m, N, M, sigma=1.0, generator=None, chunk=2000):
    """||n||^2 of M kernel draws around y = 0, float64 numpy."""
    out = []
    for start in range(0, M, chunk):
        b = min(chunk, M - start)
        g = generator[start:start + b] if isinstance(generator, list) else generator
        n = m.perturb(torch.zeros(b, N), sigma, generator=g).double()
        out.append((n ** 2).sum(1))
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------- 1. radial marginal
@pytest.mark.parametrize("N", [64, 3072])
@pytest.mark.parametrize("D", [4, 128, 2048, 3_000_000])
def test_radial_law_is_beta_prime(N, D):
    m = PFGMPP(D)
    sigma = 0.7
    ratio = noise_sqnorm(m, N, 2000, sigma, torch.Generator().manual_seed(N + D)) / (sigma ** 2 * D)
    law = stats.betaprime(N / 2, D / 2)
    assert stats.kstest(ratio, law.cdf).pvalue > P_OK
    if D <= N:  # the Gaussian (EDM) law must be rejected where the two differ visibly (N/D >= 1)
        assert stats.kstest(ratio * D, stats.chi2(N).cdf).pvalue < 1e-6


@pytest.mark.parametrize("D", [4, 128])
def test_radial_law_training_path_and_per_sample_generators(D):
    # generator=None is the training path (torch's Gamma); a generator list is the prior's path
    N = 64
    m = PFGMPP(D)
    law = stats.betaprime(N / 2, D / 2)
    torch.manual_seed(0)
    assert stats.kstest(noise_sqnorm(m, N, 3000) / D, law.cdf).pvalue > P_OK
    assert stats.kstest(noise_sqnorm(m, N, 3000, generator=gens(range(3000))) / D, law.cdf).pvalue > P_OK


# -------------------------------------------------------------------------------- 2. direction
def test_direction_uniform_and_independent_of_radius():
    N, M = 64, 20000
    n = PFGMPP(4).perturb(torch.zeros(M, N), 1.0, generator=torch.Generator().manual_seed(1)).double()
    R = n.norm(dim=1)
    u = n / R[:, None]
    # E u = 0: each coordinate has variance 1/N
    assert float(u.mean(0).abs().max()) < 4.5 / math.sqrt(N * M)
    # E u u^T = I/N: var(u_j^2) = 3/(N(N+2)) - 1/N^2, var(u_i u_j) = 1/(N(N+2))
    S = u.T @ u / M
    se_diag = math.sqrt((3 / (N * (N + 2)) - 1 / N ** 2) / M)
    se_off = math.sqrt(1 / (N * (N + 2)) / M)
    assert float((S.diagonal() - 1 / N).abs().max()) < 5 * se_diag
    off = S - torch.diag(S.diagonal())
    assert float(off.abs().max()) < 5.5 * se_off
    # independence of R and u (u_1 is symmetric, so also test u_1^2); rank correlations have SE 1/sqrt(M)
    for k in range(4):
        assert abs(stats.spearmanr(R, u[:, k]).statistic) < 4 / math.sqrt(M)
        assert abs(stats.spearmanr(R, u[:, k] ** 2).statistic) < 4 / math.sqrt(M)


# --------------------------------------------------------------------------- 3. kernel density
def test_kernel_density_histogram_matches_closed_form():
    N, D, sigma, M = 64, 16, 1.0, 20000
    r = sigma * math.sqrt(D)
    R = np.sqrt(noise_sqnorm(PFGMPP(D), N, M, sigma, torch.Generator().manual_seed(2)))

    def log_p(x):  # p_r(R) = 2 r^D R^(N-1) / (B(N/2, D/2) (R^2 + r^2)^((N+D)/2))
        return (math.log(2) + D * math.log(r) + (N - 1) * np.log(x) - special.betaln(N / 2, D / 2)
                - (N + D) / 2 * np.log(x ** 2 + r ** 2))

    edges = sigma * math.sqrt(N) * np.array([0, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8, 2.5])
    probs = [integrate.quad(lambda x: math.exp(log_p(x)), a, b, epsabs=0, epsrel=1e-10)[0]
             for a, b in zip(edges[:-1], edges[1:])]
    probs.append(1 - sum(probs))
    counts = np.histogram(R, np.append(edges, np.inf))[0]
    assert probs[-1] > 0 and abs(sum(probs) - 1) < 1e-9
    assert stats.chisquare(counts, np.array(probs) * M).pvalue > P_OK


# ------------------------------------------------------------------------------- 4. alignment
@pytest.mark.parametrize("D", [16, 128])
def test_mean_squared_noise_is_N_sigma2_D_over_D_minus_2(D):
    N, M, sigma = 64, 20000, 2.0
    z = noise_sqnorm(PFGMPP(D), N, M, sigma, torch.Generator().manual_seed(D)) / (N * sigma ** 2)
    se = z.std(ddof=1) / math.sqrt(M)
    assert abs(z.mean() - D / (D - 2)) < 4 * se
    assert abs(z.mean() - 1.0) > 4 * se  # the Gaussian value is excluded: the check has power


# ----------------------------------------------------------------------------- 5. D -> infinity
def tiny_net(x, c_noise, cond=None):
    flat = x.flatten(1)
    return (torch.tanh(flat.roll(1, dims=1) * 0.7 + c_noise[:, None]) - 0.3 * flat).reshape(x.shape)


@pytest.mark.parametrize("D", [None, math.inf, "inf"])
def test_infinite_D_is_bit_identical_to_edm(D):
    p, e = PFGMPP(D), EDM()
    y = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.linspace(0.01, 50, 6)
    assert torch.equal(p.perturb(y, sigma, generator=torch.Generator().manual_seed(1)),
                       e.perturb(y, sigma, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(3)
    lp = p.loss(tiny_net, y)
    torch.manual_seed(3)
    assert torch.equal(lp, e.loss(tiny_net, y))
    zp = p.prior_sample(y.shape, generator=gens(range(6)))
    ze = e.prior_sample(y.shape, generator=gens(range(6)))
    assert torch.equal(zp, ze)
    assert torch.equal(p.prior_log_prob(zp), e.prior_log_prob(ze))
    assert torch.equal(p.sample(tiny_net, zp, steps=7), e.sample(tiny_net, ze, steps=7))
    assert torch.equal(p.time_grid(18), e.time_grid(18)) and p.nfe(18) == e.nfe(18) == 35


def test_large_D_noise_matches_chi_quantiles():
    # at D = 1e7 the quantiles of ||n||/(sigma sqrt N) at N = 3072 are the chi values 0.961/1.000/1.040
    N, M = 3072, 4000
    s = np.sqrt(noise_sqnorm(PFGMPP(1e7), N, M, 1.0, torch.Generator().manual_seed(4)) / N)
    for q, x in zip([0.001, 0.5, 0.999], np.sqrt(stats.chi2.ppf([0.001, 0.5, 0.999], N) / N)):
        assert round(x, 3) == {0.001: 0.961, 0.5: 1.000, 0.999: 1.040}[q]
        count = (s <= x).sum()
        assert abs(count - M * q) <= 4 * math.sqrt(M * q * (1 - q)) + 1


# ------------------------------------------------------------------------------ 6. no clipping
@pytest.mark.parametrize("N,D,side", [(3072, 3_072_000, "low"), (12288, 16, "high")])
def test_no_truncation_at_extreme_N_over_D(N, D, side):
    M = 2000
    b = noise_sqnorm(PFGMPP(D), N, M, 1.0, torch.Generator().manual_seed(5)) / D  # R^2 / r^2
    law = stats.betaprime(N / 2, D / 2)
    assert stats.kstest(b, law.cdf).pvalue > P_OK
    # t = b / (1 + b) ~ Beta(N/2, D/2); the reference code clips t to [1e-3, 1 - 1e-3]
    edge = 1e-3 / (1 - 1e-3) if side == "low" else (1 - 1e-3) / 1e-3
    frac = law.cdf(edge) if side == "low" else law.sf(edge)
    assert frac > 0.25  # a large share of the law lies beyond the clip (51.9% / 27.7%)
    beyond = (b < edge) if side == "low" else (b > edge)
    assert abs(beyond.mean() - frac) < 4 * math.sqrt(frac * (1 - frac) / M)
    clipped = np.clip(b, 1e-3 / (1 - 1e-3), (1 - 1e-3) / 1e-3)
    assert stats.kstest(clipped, law.cdf).pvalue < 1e-10  # what clipping would have produced is rejected


def test_heavy_tails_need_opt_in():
    for D in (2, 1.5, 1):
        with pytest.raises(ConfigError, match="second moment"):
            PFGMPP(D)
    for bad in (0, -4, "abc", True, float("nan")):
        with pytest.raises(ConfigError):
            PFGMPP(bad)
    with pytest.raises(ConfigError):
        PFGMPP(2, allow_heavy_tails=True, correct_c_in=True)
    # with the opt-in, D = 1 (Gamma(1/2): Marsaglia-Tsang's boost path) still follows the law
    m = PFGMPP(1, allow_heavy_tails=True)
    law = stats.betaprime(32, 0.5)
    assert stats.kstest(noise_sqnorm(m, 64, 2000, generator=gens(range(2000))), law.cdf).pvalue > P_OK
    torch.manual_seed(0)
    assert stats.kstest(noise_sqnorm(m, 64, 2000), law.cdf).pvalue > P_OK


# ------------------------------------------------------------------- 7. c_in (paper vs corrected)
def test_c_in_uncorrected_by_default_and_corrected_on_request():
    s = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    torch.testing.assert_close(PFGMPP(64).preconditioning(s)[2], EDM().preconditioning(s)[2], rtol=0, atol=0)
    c_in = PFGMPP(64, correct_c_in=True).preconditioning(s)[2]
    torch.testing.assert_close(c_in, 1 / (s ** 2 * 64 / 62 + 0.25).sqrt(), rtol=1e-14, atol=0)
    # c_noise is ln(sigma)/4, never a function of r = sigma sqrt(D)
    torch.testing.assert_close(PFGMPP(3_072_000).preconditioning(s)[3], s.log() / 4)


# ------------------------------------------------------------------------------------ 8. prior
@pytest.mark.parametrize("D", [8, 128])
def test_prior_radial_law_and_sigma_max_consistency(D):
    N, M = 64, 3000
    m = PFGMPP(D, sigma_max=10.0)
    assert float(m.time_grid(18)[0]) == pytest.approx(10.0, rel=1e-13)
    assert m.r_max == pytest.approx(10.0 * math.sqrt(D))
    x = m.prior_sample((M, 4, 4, 4), generator=gens(range(M))).double().flatten(1)
    b = ((x ** 2).sum(1) / m.r_max ** 2).numpy()
    assert stats.kstest(b, stats.betaprime(N / 2, D / 2).cdf).pvalue > P_OK
    # a prior at a hard-coded radius 80 would be rejected
    assert stats.kstest(b * 100 / 6400, stats.betaprime(N / 2, D / 2).cdf).pvalue < 1e-10


def test_prior_is_reproducible_per_seed_and_batch_invariant():
    m = PFGMPP(128)
    full = m.prior_sample((8, 3, 4, 4), generator=gens(range(8)))
    part = m.prior_sample((3, 3, 4, 4), generator=gens([5, 2, 7]))
    assert torch.equal(part, full[[5, 2, 7]])
    again = m.prior_sample((8, 3, 4, 4), generator=gens(range(8)))
    assert torch.equal(full, again)
    # the Gamma part of the prior, not only the direction, differs between seeds
    norms = full.flatten(1).norm(dim=1)
    assert len(set(norms.tolist())) == 8


def test_prior_is_batch_invariant_through_the_gamma_fallback():
    # block=1 forces many samples through the per-sample rejection loop
    ref = [float(sample_gamma(1.3, 1, generator=gens([s]), block=1)) for s in range(12)]
    batch = sample_gamma(1.3, 12, generator=gens(range(12)), block=1)
    assert batch.tolist() == ref


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5, 64.0, 1.5e6])
@pytest.mark.parametrize("mode", ["list", "single", "fallback"])
def test_generator_aware_gamma_law(alpha, mode):
    M = 4000
    if mode == "list":
        g = sample_gamma(alpha, M, generator=gens(range(M)))
    else:
        g = sample_gamma(alpha, M, generator=torch.Generator().manual_seed(9), block=1 if mode == "fallback" else 8)
    assert g.dtype == torch.float64 and g.shape == (M,)
    assert stats.kstest(g.numpy(), stats.gamma(alpha).cdf).pvalue > P_OK
    if alpha >= 64:  # relative spread is 1/sqrt(alpha): a 1% shift must already be rejected at 1.5e6
        assert stats.kstest(g.numpy(), stats.gamma(alpha * (1.02 if alpha < 1e3 else 1.002)).cdf).pvalue < 1e-6


@pytest.mark.parametrize("D", [3, 128, 2048, 3_072_000, math.inf])
def test_prior_log_prob_matches_scipy(D):
    N = 16
    m = PFGMPP(D, allow_heavy_tails=True)
    x = m.prior_sample((6, 4, 4), generator=gens(range(6)))
    x = torch.cat([x, torch.zeros(1, 4, 4), 0.01 * x[:1]])
    flat = x.double().flatten(1).numpy()
    if math.isinf(D):
        ref = stats.multivariate_normal(mean=np.zeros(N), cov=80.0 ** 2).logpdf(flat)
    else:
        ref = stats.multivariate_t(loc=np.zeros(N), shape=80.0 ** 2 * np.eye(N), df=D).logpdf(flat)
    torch.testing.assert_close(m.prior_log_prob(x), torch.as_tensor(ref), rtol=1e-9, atol=1e-7)


# ---------------------------------------------------------------------------------- 9. sampler
class OracleNet:
    """Raw network whose preconditioned output is a given exact denoiser f(x, sigma) (float64)."""

    def __init__(self, method, denoiser):
        self.m, self.f = method, denoiser

    def __call__(self, x_in, c_noise, cond=None):
        sigma = (4 * c_noise.double()).exp()
        s = sigma.reshape(-1, *[1] * (x_in.ndim - 1))
        c_skip, c_out, c_in, _ = self.m.preconditioning(s)
        x = x_in.double() / c_in
        return ((self.f(x, sigma) - c_skip * x) / c_out).to(x_in.dtype)


@pytest.mark.parametrize("D", [4, 128, 3_072_000, None])
@pytest.mark.parametrize("solver", ["heun", "euler", "dopri5"])
def test_point_mass_lands_on_the_point(D, solver):
    m = PFGMPP(D)
    y0 = torch.tensor([0.3, -0.7, 0.1, 0.9]).reshape(1, 1, 2, 2)
    net = OracleNet(m, lambda x, s: y0.double().expand_as(x))
    noise = m.prior_sample((16, 1, 2, 2), generator=gens(range(16)))
    out = m.sample(net, noise, steps=18, solver=solver)
    torch.testing.assert_close(out, y0.expand_as(out), rtol=0, atol=2e-5)


def point_posterior_mean(Y, w, D):
    """Exact denoiser of sum_i w_i delta(y_i) under the PFGM++ kernel (Gaussian for D = inf)."""
    Y, logw0 = Y.double(), torch.as_tensor(w, dtype=torch.float64).log()

    def f(x, sigma):
        d2 = ((x[:, None, :] - Y[None]) ** 2).sum(-1)
        s2 = sigma[:, None] ** 2
        if math.isinf(D):
            logw = logw0 - d2 / (2 * s2)
        else:
            logw = logw0 - (Y.shape[1] + D) / 2 * torch.log(d2 + s2 * D)
        return torch.softmax(logw, 1) @ Y

    return f


@pytest.mark.parametrize("D", [4, 16, 128, None])
def test_exact_denoiser_transports_prior_to_few_point_data(D):
    # the ODE from the prior at r_max must land on the data points, with the data's weights
    m = PFGMPP(D)
    Y = torch.tensor([[1.0, 0.5], [-1.2, 0.3], [0.2, -1.5]])
    w = [0.5, 0.3, 0.2]
    M = 3000
    noise = m.prior_sample((M, 2), generator=gens(range(M)))
    out = m.sample(OracleNet(m, point_posterior_mean(Y, w, m.D)), noise, steps=32)
    dist = torch.cdist(out.double(), Y.double())
    assert float(dist.min(1).values.max()) < 1e-4
    counts = np.bincount(dist.argmin(1).numpy(), minlength=3)
    assert stats.chisquare(counts, np.array(w) * M).pvalue > P_OK
    assert stats.chisquare(counts, np.array([0.45, 0.33, 0.22]) * M).pvalue < 1e-4  # power check


def test_large_D_denoiser_matches_gaussian_denoiser():
    Y = torch.tensor([[1.0, 0.5, 0.0], [-1.2, 0.3, 0.4], [0.2, -1.5, -0.3]])
    w = [0.5, 0.3, 0.2]
    f_t, f_g = point_posterior_mean(Y, w, 1e9), point_posterior_mean(Y, w, math.inf)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    for s in (0.2, 1.0, 10.0):
        sigma = torch.full((50,), s, dtype=torch.float64)
        torch.testing.assert_close(f_t(x, sigma), f_g(x, sigma), rtol=0, atol=1e-5)
        # at moderate D the two differ: the test can tell them apart
        assert float((point_posterior_mean(Y, w, 8)(x, sigma) - f_g(x, sigma)).abs().max()) > 1e-3
    m_t, m_g = PFGMPP(1e9), PFGMPP(None)
    noise = m_g.prior_sample((200, 3), generator=gens(range(200)))
    a = m_t.sample(OracleNet(m_t, f_t), noise, steps=18)
    b = m_g.sample(OracleNet(m_g, f_g), noise, steps=18)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


# -------------------------------------------------------------- golden table
# quantiles 0.001 / 0.5 / 0.999 of ||n|| / (sigma sqrt N) at N = 3072, from the BetaPrime law
GOLDEN = {
    math.inf: (0.960730, 0.999891, 1.039571),
    3_072_000: (0.960712, 0.999892, 1.039592),
    2048: (0.939837, 1.000054, 1.064682),
    128: (0.832059, 1.002503, 1.237204),
    64: (0.779074, 1.005130, 1.362413),
}
QS = (0.001, 0.5, 0.999)


def test_golden_quantile_table_from_the_law():
    N = 3072
    for D, row in GOLDEN.items():
        if math.isinf(D):
            exact = np.sqrt(stats.chi2.ppf(QS, N) / N)
        else:
            exact = np.sqrt(D * stats.betaprime.ppf(QS, N / 2, D / 2) / N)
        np.testing.assert_allclose(exact, row, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("D", list(GOLDEN))
def test_golden_quantiles_are_sampled(D):
    N, M = 3072, 20000
    s = np.sqrt(noise_sqnorm(PFGMPP(D), N, M, 1.0, torch.Generator().manual_seed(6)) / N)
    for q, x in zip(QS, GOLDEN[D]):
        count = (s <= x).sum()  # Binomial(M, q) under the law
        assert abs(count - M * q) <= 4 * math.sqrt(M * q * (1 - q)) + 1, (D, q, count)
