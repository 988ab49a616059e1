"""Shortest-path diffusion (Das et al., ICML 2023): schedules, spectra and sampling against closed forms, plus errors.

Closed forms are checked against independent computations (mpmath at 40 digits, plain float64
formulas written out here); statistical checks use fixed seeds and tolerances from their standard
errors. Spectra are in orthonormal-FFT units.
"""
from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

from genflow.errors import CheckpointError, ConfigError
from genflow.methods import DDPM, SPD
from genflow.methods.spectrum import (_negated, empirical_spectrum, estimate_spectrum, fit_power_law,
                                      power_law_spectrum, radial_frequency)

mp.mp.dps = 40
F64 = torch.float64


def cifar_fit(n: int = 32) -> torch.Tensor:
    """The reference code's radial spectrum c1 / (c2 + |k|)^m with c1 = 1.59, c2 = 0.0086, m = 2."""
    return power_law_spectrum(1.59, 0.0086, 2.0, n, n)


def gaussian_images(S: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Stationary Gaussian images with E|fft2_ortho(x)_k|^2 = S_k: x = F^-1(sqrt(S) F xi)."""
    C = S.shape[0] if S.ndim == 3 else 1
    xi = torch.randn(n, C, *S.shape[-2:], generator=torch.Generator().manual_seed(seed), dtype=F64)
    return torch.fft.ifft2(S.sqrt() * torch.fft.fft2(xi, norm="ortho"), norm="ortho").real


def bin_variance(S: torch.Tensor) -> torch.Tensor:
    """Relative variance of |u_k|^2 / S_k for one image: 2 on self-conjugate bins (real), 1 otherwise."""
    H, W = S.shape[-2:]
    i = torch.arange(H)[:, None]
    j = torch.arange(W)[None, :]
    real = ((2 * i) % H == 0) & ((2 * j) % W == 0)
    return torch.where(real, 2.0, 1.0).to(F64)


class OracleNet:
    """The exact posterior-mean noise predictor for Gaussian data with spectrum S:
    eps_hat = F^-1[sqrt(1 - abar) U / (abar S + 1 - abar)], abar from the plain formula (S^tau - 1)/(S - 1)."""

    def __init__(self, S: torch.Tensor, label_scale: float = 1000.0):
        self.S, self.label_scale = S.to(F64), label_scale

    def __call__(self, x, label, cond=None):
        s = (label.to(F64) / self.label_scale).reshape(-1, 1, 1, 1)
        half = x.shape[-1] // 2 + 1
        S = self.S[..., :half]
        ab = (S ** (1 - s) - 1) / (S - 1)
        U = torch.fft.rfft2(x.to(F64), norm="ortho")
        out = torch.fft.irfft2((1 - ab).sqrt() * U / (ab * S + 1 - ab), s=x.shape[-2:], norm="ortho")
        return out.to(x.dtype)


def chord_length(lam: torch.Tensor, channels: int = 1) -> torch.Tensor:
    """Fisher length of a Fourier-diagonal Gaussian path sampled at rows of lam (n_times, ...):
    the metric is Euclidean in ln(lambda) with weight 1/2, so the chord sum converges from below."""
    d = lam.log().flatten(1).diff(dim=0)
    return (0.5 * channels * d.square().sum(1)).sqrt().sum()


def mp_alpha_bar(S: float, s: float):
    """(abar, 1 - abar) at 40 digits; 1 - abar = S^tau expm1(s ln S) / expm1(ln S) keeps tiny s exact."""
    S, s = mp.mpf(S), mp.mpf(s)
    tau, L = 1 - s, mp.log(S)
    if S == 1:
        return tau, s
    return mp.expm1(tau * L) / mp.expm1(L), mp.exp(tau * L) * mp.expm1(s * L) / mp.expm1(L)


# ---------------------------------------------------------------------------------- 1. marginals
def test_geodesic_marginals_closed_form():
    gen = torch.Generator().manual_seed(0)
    rough = torch.rand(3, 8, 8, generator=gen, dtype=F64) * 40 + 1e-3
    for S in (cifar_fit(), 0.5 * (rough + _negated(rough))):
        spd = SPD(S, T=100)
        s = torch.linspace(0, 1, 41, dtype=F64)
        expected = S ** (1 - s.reshape(-1, *[1] * S.ndim))
        assert ((spd.marginal_variance(s) / expected - 1).abs().max() < 1e-12)
        total = spd.alpha_bar(s) + spd.one_minus_alpha_bar(s)
        assert (total - 1).abs().max() < 1e-14


def test_geodesic_marginals_monte_carlo():
    S = power_law_spectrum(2.0, 0.5, 2.0, 8, 8)[None]            # S from 32 (DC) to 0.06
    n, s = 4000, 0.3
    x0 = gaussian_images(S, n, seed=1).float()
    spd = SPD(S, T=100)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    xs = spd.q_sample(x0, s, noise)
    ratio = torch.fft.fft2(xs.to(F64), norm="ortho").abs().square().mean(0) / S ** (1 - s)
    z = (ratio - 1) / (bin_variance(S) / n).sqrt()
    assert z.abs().max() < 4.5, z.abs().max()


# ------------------------------------------------------------------ 2. length and constant speed
def test_fisher_length_closed_form_and_constant_speed():
    S = cifar_fit().expand(3, 32, 32).clone()                   # C = 3 channels sharing the fit
    spd = SPD(S, T=100)
    lam = spd.marginal_variance(torch.linspace(0, 1, 101, dtype=F64))
    steps = (0.5 * lam.log().flatten(1).diff(dim=0).square().sum(1)).sqrt()
    # independent: sqrt(1/2 * 3 * sum_k ln^2 S_k) in mpmath over the integer-frequency grid
    total = mp.mpf(0)
    for ky in range(-16, 16):
        for kx in range(-16, 16):
            total += mp.log(mp.mpf("1.59") / (mp.mpf("0.0086") + mp.sqrt(kx * kx + ky * ky)) ** 2) ** 2
    L_star = float(mp.sqrt(mp.mpf(3) / 2 * total))
    assert L_star == pytest.approx(175.45048832208236, rel=1e-14)  # golden value of the reference fit
    assert float(spd.fisher_length()) == pytest.approx(L_star, rel=1e-13)
    assert float(steps.sum()) == pytest.approx(L_star, rel=1e-12)
    assert float((steps / steps.mean() - 1).abs().max()) < 1e-10  # constant Fisher speed in s


# ---------------------------------------------------------------------------- 3. SPD is shortest
def _path_length(alpha_bar: torch.Tensor, S: torch.Tensor, channels: int) -> float:
    """Length of lambda(s) = abar S + 1 - abar on the grid plus the residual distance to N(0, I)."""
    lam = alpha_bar * S + 1 - alpha_bar
    residual = (0.5 * channels * lam[-1].log().square().sum()).sqrt()
    return float(chord_length(lam, channels) + residual)


def test_spd_is_shortest_against_ddpm_and_misspecified_spectra():
    S = cifar_fit(16)
    s = torch.linspace(0, 1, 2001, dtype=F64)                 # chord sums are converged to < 1e-12 here
    L_star = float(SPD(S, T=1000).fisher_length())
    spd_len = _path_length(SPD(S, T=1000).alpha_bar(s), S, 1)
    assert spd_len == pytest.approx(L_star, rel=1e-10)
    for schedule in ("linear", "cosine"):
        ab = DDPM(schedule).alpha_bar(s).reshape(-1, 1, 1)
        # every isotropic schedule traces the same curve abar -> abar S + 1 - abar: ~12% longer at N = 16
        assert _path_length(ab, S, 1) > 1.1 * L_star, schedule
    lengths = {}
    for m in (1.9, 1.95, 2.0, 2.05, 2.1):
        wrong = SPD(power_law_spectrum(1.59, 0.0086, m, 16, 16), T=1000)
        lengths[m] = _path_length(wrong.alpha_bar(s), S, 1)
    assert min(lengths, key=lengths.get) == 2.0
    for c1 in (0.5 * 1.59, 2 * 1.59, 4 * 1.59):
        wrong = SPD(power_law_spectrum(c1, 0.0086, 2.0, 16, 16), T=1000)
        assert _path_length(wrong.alpha_bar(s), S, 1) > L_star * (1 + 1e-7)


# ------------------------------------------------------------------ 4. flat-spectrum reduction
def test_flat_spectrum_is_isotropic_diffusion():
    c = 5.0
    spd = SPD(torch.full((8, 8), c, dtype=F64), T=200)
    s = torch.linspace(0, 1, 51, dtype=F64)
    ab = spd.alpha_bar(s)
    assert (ab - ab[:, :1, :1]).abs().max() == 0
    assert torch.allclose(ab[:, 0, 0], (c ** (1 - s) - 1) / (c - 1), rtol=1e-13, atol=1e-15)
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    a = float(ab[20, 0, 0])
    iso = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    assert torch.allclose(spd.q_sample(x0, s[20], noise), iso, atol=1e-5)
    # every isotropic schedule is a reparameterisation of the same geodesic: same length
    S = torch.full((8, 8), c, dtype=F64)
    fine = torch.linspace(0, 1, 4001, dtype=F64)
    L_star = float(spd.fisher_length())
    assert L_star == pytest.approx(math.sqrt(0.5 * 64) * math.log(c), rel=1e-14)
    for schedule in ("linear", "cosine"):
        length = _path_length(DDPM(schedule).alpha_bar(fine).reshape(-1, 1, 1), S, 1)
        assert length == pytest.approx(L_star, rel=1e-9), schedule


def test_unit_spectrum_is_linear_and_has_zero_length():
    spd = SPD(torch.ones(2, 4, 4, dtype=F64), T=50)
    s = torch.linspace(0, 1, 21, dtype=F64)
    assert torch.allclose(spd.alpha_bar(s)[:, 0, 0, 0], 1 - s, rtol=0, atol=1e-16)
    assert torch.allclose(spd.rate(s[:-1])[:, 0, 0, 0], 1 / (1 - s[:-1]), rtol=1e-14)
    assert float(spd.fisher_length()) == 0.0
    assert torch.isfinite(spd.betas).all() and torch.isfinite(spd.alphas_cumprod).all()


# -------------------------------------------------------------------------- 5. limits, stability
EXTREMES = [1e-300, 1e-12, 1e-3, 1 - 1e-12, 1.0, 1 + 1e-12, 1 + 1e-7, 1e3, 1e12, 1e300]
TIMES = [0.0, 1e-300, 1e-15, 1e-8, 0.3, 0.5, 1 - 1e-8, 1 - 1e-15, 1.0]


def test_limits_against_mpmath():
    S = torch.tensor(EXTREMES, dtype=F64)[:, None, None].expand(-1, 2, 2).clone()
    spd = SPD(S, T=1000)
    s = torch.tensor(TIMES, dtype=F64)
    ab, omab, rate = spd.alpha_bar(s), spd.one_minus_alpha_bar(s), spd.rate(s)
    assert torch.isfinite(ab).all() and torch.isfinite(omab).all()
    assert (ab >= 0).all() and (ab <= 1).all() and (omab >= 0).all() and (omab <= 1).all()
    assert (ab.diff(dim=0) <= 0).all()                          # monotone in s
    assert not torch.isnan(rate).any() and torch.isfinite(rate[:-1]).all()  # beta -> inf only at s = 1
    for i, t in enumerate(TIMES):
        for c, Sk in enumerate(EXTREMES):
            ref, ref_noise = mp_alpha_bar(Sk, t)
            if t < 1:
                assert float(spd.log_alpha_bar(t)[c, 0, 0]) == pytest.approx(float(mp.log1p(-ref_noise) if ref > 0.5 else mp.log(ref)), rel=1e-12, abs=1e-300)
            for got, want in ((ab[i, c, 0, 0], ref), (omab[i, c, 0, 0], ref_noise)):
                want = float(want)
                assert abs(float(got) - want) <= 1e-12 * abs(want) + 1e-300, (Sk, t, float(got), want)
            if t < 1:
                L, tau = mp.log(mp.mpf(Sk)), 1 - mp.mpf(t)
                want = 1 / tau if L == 0 else L * mp.exp(tau * L) / mp.expm1(tau * L)
                assert float(rate[i, c, 0, 0]) == pytest.approx(float(want), rel=1e-12), (Sk, t)
    betas = spd.betas
    assert torch.isfinite(betas).all() and (betas > 0).all() and (betas < 1).all()
    rebuilt = torch.cumprod(1 - betas, dim=0)
    assert ((rebuilt - spd.alphas_cumprod).abs() / spd.alphas_cumprod).max() < 1e-10
    assert torch.allclose(spd.alphas_cumprod, spd.alpha_bar(spd.grid_times()), rtol=1e-12, atol=0)  # exp(ln abar): 1e-16 |ln abar|


# ------------------------------------------------------------ 6. sharpening, noise deblurring
def test_sharpening_noise_deblurring_and_snr_crossing():
    S = cifar_fit()
    spd = SPD(S, T=4000)
    s = torch.linspace(0.01, 0.99, 99, dtype=F64)
    ab = spd.alpha_bar(s)
    assert (ab.diff(dim=0) < 0).all()                           # decreasing in s
    order = S.flatten().argsort()                               # increasing S
    per_S = ab.flatten(1)[:, order]
    distinct = S.flatten()[order].diff() > 1e-12 * S.flatten()[order][1:]
    assert (per_S.diff(dim=1)[:, distinct] < 0).all()           # decreasing in S: high-pass signal
    noise = 1 - per_S
    assert (noise.diff(dim=1)[:, distinct] > 0).all()           # low-pass (blurred) noise for s < 1
    assert (spd.one_minus_alpha_bar(1 - 1e-9) > 1 - 1e-7).all()  # white noise at s -> 1
    # SNR_k = 1 at tau* = ln(2S/(S+1)) / ln S
    s_star = spd.snr_crossing_time()
    snr = spd.alpha_bar(s_star.flatten()).flatten(1).diagonal() * S.flatten() \
        / spd.one_minus_alpha_bar(s_star.flatten()).flatten(1).diagonal()
    assert (snr - 1).abs().max() < 1e-10
    for idx in ((0, 0), (16, 16)):
        Sk = mp.mpf(float(S[idx]))
        assert float(s_star[idx]) == pytest.approx(float(1 - mp.log(2 * Sk / (Sk + 1)) / mp.log(Sk)), rel=1e-13)
    assert float(s_star[16, 16]) == pytest.approx(0.1195, abs=5e-4)  # spread [0.12, 0.93] of the note
    assert float(s_star[0, 0]) == pytest.approx(0.9305, abs=5e-4)


# ------------------------------------------------------------------ 7. realness and Parseval
def test_realness_parseval_and_even_spectrum():
    gen = torch.Generator().manual_seed(5)
    S = estimate_spectrum(torch.randn(64, 2, 8, 6, generator=gen), "empirical", cache=False)
    for spec in (cifar_fit(16), S):
        assert torch.equal(spec, _negated(spec)) or (spec - _negated(spec)).abs().max() < 1e-12 * spec.max()
        spd = SPD(spec, T=100)
        coef = spd.alpha_bar(torch.tensor([0.2, 0.7], dtype=F64)).sqrt()
        x = torch.randn(2, 2, *spec.shape[-2:], generator=gen, dtype=F64)
        out = torch.fft.ifft2(spd._bcast(coef, x) * torch.fft.fft2(x, norm="ortho"), norm="ortho")
        assert out.imag.abs().max() < 1e-6 * out.real.abs().max()
    H, W = 8, 8                                                 # the Nyquist row/column map to themselves
    assert torch.equal(_negated(radial_frequency(H, W)), radial_frequency(H, W))
    odd = torch.ones(8, 8, dtype=F64)
    odd[1, 2] = 3.0
    with pytest.raises(ConfigError, match="not even"):
        SPD(odd)
    # Parseval: the pixel eps-MSE is the Fourier eps-MSE
    spd = SPD(cifar_fit(8), T=100)
    x0 = torch.randn(3, 1, 8, 8, generator=gen)
    noise = torch.randn(3, 1, 8, 8, generator=gen)
    net = lambda x, label, cond=None: 0.3 * x + torch.sin(label)[:, None, None, None]
    loss = spd.loss(net, x0, s=torch.tensor([0.1, 0.5, 0.9]), noise=noise)
    pred = net(spd.q_sample(x0, torch.tensor([0.1, 0.5, 0.9], dtype=F64), noise), 1000 * torch.tensor([0.1, 0.5, 0.9]))
    fourier = torch.fft.fft2((pred - noise).to(F64), norm="ortho").abs().square().flatten(1).sum(1)
    assert torch.allclose(loss.to(F64), fourier, rtol=1e-5)


def test_oracle_loss_matches_closed_form():
    """With the posterior-mean eps, E||xi - eps_hat||^2 = sum_k abar S / lambda at fixed s."""
    S = power_law_spectrum(2.0, 0.5, 2.0, 8, 8)[None]
    spd, n, s = SPD(S, T=100), 4000, 0.4
    x0 = gaussian_images(S, n, seed=6).float()
    per = spd.loss(OracleNet(S), x0, s=s, noise=torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)))
    expected = float((spd.alpha_bar(s) * S / spd.marginal_variance(s)).sum())
    se = float(per.to(F64).std()) / math.sqrt(n)
    assert abs(float(per.to(F64).mean()) - expected) < 4 * se


# ------------------------------------------------------------------------- 8. oracle samplers
@pytest.mark.slow  # 400 steps x 512 images: ~6 s on an idle 2-core machine
def test_oracle_ancestral_sampler_reproduces_spectrum():
    S = cifar_fit(16)[None]
    spd, n = SPD(S, T=400), 512
    gens = torch.Generator().manual_seed(8)
    x = spd.sample(OracleNet(S), spd.prior_sample((n, 1, 16, 16), generator=gens), steps=400, solver="ancestral",
                   generator=gens)
    ratio = torch.fft.fft2(x.to(F64), norm="ortho").abs().square().mean(0) / S
    z = (ratio - 1) / (bin_variance(S) / n).sqrt()
    assert z.abs().max() < 4.5, float(z.abs().max())
    assert abs(float(ratio.median()) - 1) < 0.03


def test_reverse_mean_is_the_posterior_mean():
    S = cifar_fit(8)
    spd = SPD(S, T=50)
    gen = torch.Generator().manual_seed(9)
    x0, eps = torch.randn(2, 1, 8, 8, generator=gen, dtype=F64), torch.randn(2, 1, 8, 8, generator=gen, dtype=F64)
    j = 20
    ab, ab_prev = spd.alphas_cumprod[j], spd.alphas_cumprod[j - 1]
    xj = spd.q_sample(x0, spd.grid_times()[j], eps)
    got = spd.reverse_mean(xj, eps, ab, ab_prev)
    alpha, beta = ab / ab_prev, 1 - ab / ab_prev
    X0, Xj = torch.fft.fft2(x0, norm="ortho"), torch.fft.fft2(xj, norm="ortho")
    want = torch.fft.ifft2(ab_prev.sqrt() * beta / (1 - ab) * X0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * Xj,
                           norm="ortho").real
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_probability_flow_ode_is_exact_on_gaussian_data():
    """With the oracle eps each frequency follows u(s) = u(s_hi) sqrt(lambda(s) / lambda(s_hi))."""
    S = cifar_fit(8)
    spd = SPD(S, T=1000)
    noise = spd.prior_sample((4, 1, 8, 8), generator=torch.Generator().manual_seed(10)).to(F64)
    scale = (spd.marginal_variance(spd.s_lo) / spd.marginal_variance(spd.s_hi)).sqrt()
    exact = torch.fft.ifft2(scale * torch.fft.fft2(noise, norm="ortho"), norm="ortho").real
    x = spd.sample(OracleNet(S), noise, steps=1, solver="dopri5")
    assert (x - exact).abs().max() < 2e-4 * exact.abs().max()
    x = spd.sample(OracleNet(S), noise, steps=100, solver="heun")
    assert (x - exact).abs().max() < 5e-3 * exact.abs().max()  # measured 1.9e-3 (the DC mode grows ~e^(5 s))
    karras = SPD(S, T=1000, ode_grid="karras")
    grid = karras.time_grid(30)
    assert float(grid[0]) == spd.s_hi and float(grid[-1]) == spd.s_lo and (grid.diff() < 0).all()
    x = karras.sample(OracleNet(S), noise, steps=100, solver="heun")
    assert (x - exact).abs().max() < 3e-2 * exact.abs().max()  # measured 1.2e-2: fewer mid-range steps


def test_prior_log_prob_is_the_dense_gaussian():
    S = power_law_spectrum(3.0, 0.3, 1.5, 4, 4).expand(2, 4, 4).clone()
    spd = SPD(S, T=10)
    lam = spd.prior_variance()
    assert torch.allclose(lam, S ** 0.1, rtol=1e-14)
    basis = torch.eye(32, dtype=F64).reshape(32, 2, 4, 4)
    cov = torch.fft.ifft2(lam * torch.fft.fft2(basis, norm="ortho"), norm="ortho").real.reshape(32, 32)
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(11), dtype=F64)
    dense = torch.distributions.MultivariateNormal(torch.zeros(32, dtype=F64), covariance_matrix=cov)
    assert torch.allclose(spd.prior_log_prob(x), dense.log_prob(x.reshape(5, 32)), rtol=1e-12)


# ------------------------------------------------------------------------ 9. spectrum estimator
def test_spectrum_estimator_recovers_known_constants(tmp_path, monkeypatch):
    monkeypatch.setenv("GENFLOW_CACHE", str(tmp_path))
    c1, c2, m, n = 1.59, 0.0086, 2.0, 2000
    S = power_law_spectrum(c1, c2, m, 32, 32)
    x = gaussian_images(S[None], n, seed=12).float()
    P = empirical_spectrum(x)
    z = (P[0] / S - 1) / (bin_variance(S) / n).sqrt()
    assert z.abs().max() < 5
    fit = fit_power_law(P)[0]
    # c1 and m come from ~500 rings, c2 from the DC bin alone (relative s.e. sqrt(2/n) / m = 1.6%)
    assert float(fit[0]) == pytest.approx(c1, rel=0.02)
    assert float(fit[2]) == pytest.approx(m, rel=0.01)
    assert float(fit[1]) == pytest.approx(c2, rel=4 * math.sqrt(2 / n) / m)
    radial = estimate_spectrum(x, "radial")
    assert list(tmp_path.glob("spd_spectrum_*_radial_*.safetensors"))
    monkeypatch.setattr("genflow.methods.spectrum.empirical_spectrum", lambda *a, **k: pytest.fail("cache not used"))
    assert torch.equal(estimate_spectrum(x, "radial"), radial)   # second call: from the cache
    with pytest.raises(BaseException):
        estimate_spectrum(x[:-1], "radial")                      # different data -> different key


def test_from_data_and_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("GENFLOW_CACHE", str(tmp_path))
    x = gaussian_images(power_law_spectrum(2.0, 0.5, 2.0, 8, 8)[None], 256, seed=13).float()

    class DM:
        data_shape = (1, 8, 8)

        def train_tensor(self):
            return x

    spd = SPD.from_data(x, T=100, source="empirical")
    prepared = SPD(T=100)
    prepared.prepare(DM())
    assert torch.equal(spd.spectrum, prepared.spectrum)
    const = SPD(T=100, source="constants", c1=1.59, c2=0.0086, m=2.0)
    const.prepare(DM())
    assert torch.allclose(const.spectrum, power_law_spectrum(1.59, 0.0086, 2.0, 8, 8), rtol=1e-15)


# ------------------------------------------------------------------------- 10. golden values
GOLDEN = {  # N = 32, T = 4000, reference fit; (abar_0, abar_{T-1}, beta_{T-1}) from mpmath, 40 digits
    (0, 0): (0.99750906135016169, 1.1615713976955596e-7, 0.50056088084139933),
    (16, 16): (0.99999550242114957, 0.0014472869086987985, 0.49957656236220041),
}


def test_golden_values_and_float32_reference_difference():
    T = 4000
    spd = SPD(cifar_fit(), T=T)
    for (i, j), (ab0, abl, betal) in GOLDEN.items():
        k = mp.sqrt(i * i + j * j)
        Sk = mp.mpf("1.59") / (mp.mpf("0.0086") + k) ** 2

        def ab(jj):
            tau = (T - (1 + mp.mpf(jj) * (T - 2) / (T - 1))) / T
            return (Sk ** tau - 1) / (Sk - 1)

        live = (ab(0), ab(T - 1), 1 - ab(T - 1) / ab(T - 2))
        for got, pinned, ref in zip((spd.alphas_cumprod[0, i, j], spd.alphas_cumprod[-1, i, j], spd.betas[-1, i, j]),
                                    (ab0, abl, betal), live):
            assert float(ref) == pytest.approx(pinned, rel=1e-15)
            assert float(got) == pytest.approx(pinned, rel=1e-12)
    # the reference's float32 (1 - S^tau)/(1 - S) is off by up to ~1.8% in beta; ours is the float64 value
    t = torch.linspace(1, T - 1, T)
    S32 = cifar_fit().float()
    ab32 = (1 - S32 ** ((T - t) / T)[:, None, None]) / (1 - S32)
    beta32 = 1 - ab32 / torch.cat([torch.ones_like(ab32[:1]), ab32[:-1]])
    rel = ((beta32.to(F64) - spd.betas).abs() / spd.betas).max()
    assert 0.01 < float(rel) < 0.03
    assert float(spd.betas.max()) == pytest.approx(0.50056088084139933, rel=1e-12)  # the 0.999 clamp never fires


# --------------------------------------------------------------------------------------- errors
def test_errors_shape_T_and_checkpoint_T():
    spd = SPD(cifar_fit(8), T=20)
    net = lambda x, label, cond=None: x
    with pytest.raises(ConfigError, match="does not match the spectrum"):
        spd.loss(net, torch.zeros(2, 1, 16, 16))
    with pytest.raises(ConfigError, match="does not match the spectrum"):
        SPD(cifar_fit(8).expand(3, 8, 8).clone(), T=20).loss(net, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="too small"):
        SPD(cifar_fit(8), T=2)
    with pytest.raises(ConfigError, match="too small"):      # T=3 cannot resolve S = 1e300: beta_0 > 0.999
        SPD(torch.full((4, 4), 1e300, dtype=F64), T=3)
    with pytest.raises(ConfigError, match="no schedule yet"):
        SPD(T=20).loss(net, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="zero, negative"):
        SPD(torch.zeros(4, 4))

    class DM:
        data_shape = (1, 16, 16)
    with pytest.raises(ConfigError, match="does not match the spectrum"):
        spd.prepare(DM())
    with pytest.raises(ConfigError, match="steps"):
        spd.sample(net, torch.zeros(1, 1, 8, 8), steps=21, solver="ancestral")
    with pytest.raises(ConfigError, match="not a sampler of SPD"):
        spd.sample(net, torch.zeros(1, 1, 8, 8), steps=2, solver="rk4")


def test_checkpoint_restores_tables_without_data(tmp_path):
    spd = SPD(cifar_fit(8).expand(2, 8, 8).clone(), T=30)
    torch.save(spd.state_dict(), tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(state) == {"trained_T", "spectrum"}
    fresh = SPD(T=30)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.alphas_cumprod, spd.alphas_cumprod) and torch.equal(fresh.betas, spd.betas)
    with pytest.raises(CheckpointError, match="T=30"):
        SPD(T=40).load_state_dict(state)


def test_samplers_are_batch_independent_and_solvers_run():
    spd = SPD(cifar_fit(8), T=20)
    weight = torch.randn(1, generator=torch.Generator().manual_seed(14))
    net = lambda x, label, cond=None: torch.tanh(weight * x + label[:, None, None, None] / 1000)
    gens = lambda n: [torch.Generator().manual_seed(i) for i in range(n)]
    big = spd.sample(net, spd.prior_sample((4, 1, 8, 8), generator=gens(4)), steps=20, solver="ancestral",
                     generator=gens(4))
    small = spd.sample(net, spd.prior_sample((2, 1, 8, 8), generator=gens(2)), steps=20, solver="ancestral",
                       generator=gens(2))
    assert torch.allclose(big[:2], small, atol=1e-6)
    noise = spd.prior_sample((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for solver, steps in (("euler", 8), ("heun", 4), ("dopri5", 1), ("ancestral", 5)):
        out = spd.sample(net, noise, steps=steps, solver=solver)
        assert out.shape == noise.shape and torch.isfinite(out).all(), solver
    assert spd.nfe(20, "ancestral") == 20 and spd.nfe(10, "heun") == 20
    grid = spd.time_grid(10)
    assert grid.dtype == F64 and float(grid[0]) == pytest.approx(1 - 1 / 20) and float(grid[-1]) == pytest.approx(1 / 20)
