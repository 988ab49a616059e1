"""EDM: preconditioning closed forms, loss weighting/reduction, log-normal sigma, Karras grid, Heun sampler
(against an independent transcription of EDM's Algorithm 1), guidance and configs."""
import math

import pytest
import torch
from scipy import stats

from genflow.errors import ConfigError
from genflow.methods import EDM, PFGMPP, guided

SD = 0.5


class Recorder:
    """Net that returns a fixed function of its input and remembers what it was called with."""

    def __init__(self, fn=None):
        self.fn = fn or (lambda x, c: torch.zeros_like(x))
        self.calls = []

    def __call__(self, x, c_noise, cond=None):
        self.calls.append((x.detach().clone(), c_noise.detach().clone(), cond))
        return self.fn(x, c_noise)


def tiny_net(x, c_noise, cond=None):
    # smooth, nonlinear, depends on the noise label and mixes dimensions: enough to tell paths apart
    flat = x.flatten(1)
    mix = torch.tanh(flat.roll(1, dims=1) * 0.7 + c_noise[:, None]) - 0.3 * flat
    return mix.reshape(x.shape)


@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
def test_preconditioning_closed_forms(sigma):
    m = EDM()
    c_skip, c_out, c_in, c_noise = (float(v) for v in m.preconditioning(torch.tensor(sigma, dtype=torch.float64)))
    assert c_skip == pytest.approx(SD ** 2 / (sigma ** 2 + SD ** 2), rel=1e-14)
    assert c_out == pytest.approx(sigma * SD / math.sqrt(sigma ** 2 + SD ** 2), rel=1e-14)
    assert c_in == pytest.approx(1 / math.sqrt(sigma ** 2 + SD ** 2), rel=1e-14)
    assert c_noise == pytest.approx(math.log(sigma) / 4, rel=1e-14)
    lam = float(m.loss_weight(torch.tensor(sigma, dtype=torch.float64)))
    assert lam == pytest.approx((sigma ** 2 + SD ** 2) / (sigma * SD) ** 2, rel=1e-14)
    assert lam * c_out ** 2 == pytest.approx(1.0, rel=1e-12)


def test_preconditioning_known_values_at_sigma_data():
    c_skip, c_out, c_in, c_noise = (float(v) for v in EDM().preconditioning(torch.tensor(0.5, dtype=torch.float64)))
    assert (c_skip, c_out, c_in, c_noise) == pytest.approx((0.5, 0.3535533905932738, 1.4142135623730951,
                                                           -0.17328679513998632), rel=1e-14)


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 4, 4), (3, 2, 3, 4, 4)])
def test_denoise_feeds_net_and_broadcasts_per_sample_sigma(shape):
    m = EDM()
    rec = Recorder(lambda x, c: torch.full_like(x, 2.0))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.002, 0.5, 80.0])
    out = m.denoise(rec, x, sigma)
    fed, c_noise, _ = rec.calls[0]
    assert c_noise.shape == (3,)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(fed[i], x[i] / math.sqrt(s ** 2 + SD ** 2))
        expect = SD ** 2 / (s ** 2 + SD ** 2) * x[i] + 2.0 * s * SD / math.sqrt(s ** 2 + SD ** 2)
        torch.testing.assert_close(out[i], expect)


@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 4, 4), (4, 2, 3, 4, 4)])
def test_loss_is_weighted_sum_over_data_dims(shape):
    m = EDM()
    rec = Recorder(tiny_net)
    y = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    loss = m.loss(rec, y)
    assert loss.shape == (4,)
    fed, c_noise, _ = rec.calls[0]
    sigma = (4 * c_noise.double()).exp()
    s = sigma.reshape(-1, *[1] * (y.ndim - 1))
    x = fed.double() * (s ** 2 + SD ** 2).sqrt()  # undo c_in: the noisy input y + n
    denoised = SD ** 2 / (s ** 2 + SD ** 2) * x + s * SD / (s ** 2 + SD ** 2).sqrt() * tiny_net(fed, c_noise).double()
    lam = (s ** 2 + SD ** 2) / (s * SD) ** 2
    expect = (lam * (denoised - y.double()) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(loss.double(), expect, rtol=2e-4, atol=1e-4)


def test_loss_matches_reference_edm_loss_with_same_seed():
    m = EDM()
    y = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    ours = m.loss(tiny_net, y)
    # independent transcription of EDMLoss: sigma from randn, then n = randn * sigma, per-sample pixel sum
    torch.manual_seed(5)
    sigma = (torch.randn(8) * 1.2 - 1.2).exp().reshape(-1, 1, 1, 1)
    n = torch.randn_like(y) * sigma
    c_skip = SD ** 2 / (sigma ** 2 + SD ** 2)
    c_out = sigma * SD / (sigma ** 2 + SD ** 2).sqrt()
    c_in = 1 / (SD ** 2 + sigma ** 2).sqrt()
    D = c_skip * (y + n) + c_out * tiny_net(c_in * (y + n), (sigma.log() / 4).flatten())
    ref = ((sigma ** 2 + SD ** 2) / (sigma * SD) ** 2 * (D - y) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_training_sigma_is_lognormal():
    m = EDM()
    rec = Recorder()
    torch.manual_seed(0)
    m.loss(rec, torch.zeros(20000, 1))
    log_sigma = 4 * rec.calls[0][1].double()
    M = log_sigma.numel()
    assert abs(float(log_sigma.mean()) + 1.2) < 4 * 1.2 / math.sqrt(M)
    assert abs(float(log_sigma.std()) - 1.2) < 4 * 1.2 / math.sqrt(2 * (M - 1))
    assert stats.kstest(log_sigma.numpy(), stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3
    # the same check must reject a shifted law (guards against a test that cannot fail)
    assert stats.kstest(log_sigma.numpy(), stats.norm(-1.1, 1.2).cdf).pvalue < 1e-6


def test_karras_grid():
    m = EDM()
    g = m.time_grid(18)
    assert g.dtype == torch.float64 and g.shape == (19,)
    assert float(g[0]) == pytest.approx(80.0, rel=1e-13)
    assert float(g[17]) == pytest.approx(0.002, rel=1e-12)
    assert float(g[18]) == 0.0
    assert bool((g[1:] < g[:-1]).all())
    i = torch.arange(18, dtype=torch.float64)
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(g[:18], expect, rtol=1e-14, atol=0)
    assert m.time_grid(1).tolist() == [80.0, 0.0]
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError):
            m.time_grid(bad)


@pytest.mark.parametrize("solver,steps,expect", [("heun", 18, 35), ("heun", 40, 79), ("euler", 18, 18)])
def test_nfe_counts_network_calls(solver, steps, expect):
    m = EDM()
    rec = Recorder(tiny_net)
    m.sample(rec, m.prior_sample((2, 3), generator=torch.Generator().manual_seed(0)), steps=steps, solver=solver)
    assert len(rec.calls) == expect == m.nfe(steps, solver)
    # no network call at sigma = 0 (the Heun correction is skipped on the last step)
    assert float((4 * rec.calls[-1][1].double()).exp()[0]) == pytest.approx(0.002, rel=1e-5)


def _edm_algorithm1(net, latents, steps):
    """EDM's deterministic sampler (Algorithm 1, churn 0), written out independently."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])

    def D(x, s):
        s32 = torch.full((x.shape[0],), float(s))
        sc = s32.reshape(-1, *[1] * (x.ndim - 1))
        c_skip, c_out = SD ** 2 / (sc ** 2 + SD ** 2), sc * SD / (sc ** 2 + SD ** 2).sqrt()
        xf = x.float()
        return (c_skip * xf + c_out * net(xf / (sc ** 2 + SD ** 2).sqrt(), s32.log() / 4)).double()

    x = latents.double()
    for k in range(steps):
        d = (x - D(x, t[k])) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < steps - 1:
            x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * (x_next - D(x_next, t[k + 1])) / t[k + 1])
        x = x_next
    return x


def test_heun_sampler_matches_edm_algorithm1():
    m = EDM()
    noise = m.prior_sample((4, 2, 3, 3), generator=torch.Generator().manual_seed(3))
    ours = m.sample(tiny_net, noise, steps=18)
    ref = _edm_algorithm1(tiny_net, noise, 18)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


def _edm_algorithm2(net, latents, steps, S_churn, S_tmin, S_tmax, S_noise, gens):
    """EDM's stochastic sampler (Algorithm 2), written out from the paper, float64 throughout; the
    noise eps_i ~ N(0, S_noise^2 I) of each step is drawn from each sample's own generator."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])

    def D(x, s):
        sc = torch.full((x.shape[0],) + (1,) * (x.ndim - 1), float(s), dtype=torch.float64)
        c_skip, c_out = SD ** 2 / (sc ** 2 + SD ** 2), sc * SD / (sc ** 2 + SD ** 2).sqrt()
        return c_skip * x + c_out * net(x / (sc ** 2 + SD ** 2).sqrt(), sc.flatten().log() / 4)

    x = latents.double()
    for k in range(steps):
        gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_tmin <= t[k] <= S_tmax else 0.0
        eps = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gens]) * S_noise
        t_hat = t[k] + gamma * t[k]
        x_hat = x + (t_hat ** 2 - t[k] ** 2).sqrt() * eps
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t[k + 1] - t_hat) * d
        if t[k + 1] != 0:
            d_prime = (x_next - D(x_next, t[k + 1])) / t[k + 1]
            x_next = x_hat + (t[k + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


@pytest.mark.parametrize("churn", [(40.0, 0.05, 50.0, 1.003), (10.0, 0.0, math.inf, 1.0), (0.0, 0.0, math.inf, 1.0)])
def test_stochastic_sampler_matches_edm_algorithm2(churn):
    S_churn, S_tmin, S_tmax, S_noise = churn
    m = EDM()
    noise = m.prior_sample((3, 2, 3, 3), generator=torch.Generator().manual_seed(3)).double()
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]
    ours = m.sample(tiny_net, noise, steps=12, solver="stochastic", generator=gens(), S_churn=S_churn,
                    S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
    # the model's own settings (the training config's model.S_churn, ...) give the same sampler
    own = EDM(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
    assert torch.equal(own.sample(tiny_net, noise, steps=12, solver="stochastic", generator=gens()), ours)
    ref = _edm_algorithm2(tiny_net, noise, 12, S_churn, S_tmin, S_tmax, S_noise, gens())
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    heun = m.sample(tiny_net, noise, steps=12, solver="heun")
    if S_churn == 0:  # no churn is Algorithm 1
        torch.testing.assert_close(ours, heun, rtol=1e-10, atol=1e-10)
    else:
        assert (ours - heun).abs().max() > 1e-3


def test_dopri5_ignores_steps_and_agrees_with_fine_heun():
    """dopri5 integrates sigma_max -> sigma_min adaptively, then x = D(x; sigma_min), whatever ``steps``."""
    m = EDM(sigma_max=10.0)
    noise = m.prior_sample((3, 2, 3, 3), generator=torch.Generator().manual_seed(4)).double()
    one = m.solve(tiny_net, noise, steps=1, solver="dopri5")
    many = m.solve(tiny_net, noise, steps=18, solver="dopri5")
    assert torch.equal(one.x, many.x) and one.nfe == many.nfe > 8
    fine = m.sample(tiny_net, noise, steps=400, solver="heun")
    torch.testing.assert_close(one.x, fine, atol=2e-3, rtol=0)


def test_prior_and_log_prob_are_gaussian_at_sigma_max():
    m = EDM(sigma_max=10.0)
    x = m.prior_sample((4000, 8), generator=torch.Generator().manual_seed(0)).double()
    assert abs(float(x.std()) - 10.0) < 4 * 10.0 / math.sqrt(2 * x.numel())
    assert float(m.time_grid(5)[0]) == pytest.approx(10.0)
    lp = m.prior_log_prob(x[:5])
    ref = stats.multivariate_normal(mean=[0.0] * 8, cov=100.0).logpdf(x[:5].numpy())
    torch.testing.assert_close(lp, torch.as_tensor(ref), rtol=1e-12, atol=1e-9)


def test_guidance_mixes_denoisers():
    m = EDM()

    def cnet(x, c_noise, cond):
        k = cond["class"]
        return torch.tanh(x) * (1 + k[:, :1, None, None]) + 0.5 * k[:, 1:2, None, None]

    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {"class": torch.eye(2)[[0, 1, 1]]}
    sigma = torch.tensor([0.3, 2.0, 40.0])
    d_c, d_u = m.denoise(cnet, x, sigma, cond), m.denoise(cnet, x, sigma, {"class": torch.zeros(3, 2)})
    d_w = m.denoise(guided(cnet, 2.5), x, sigma, cond)
    torch.testing.assert_close(d_w, d_u + 2.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    noise = m.prior_sample(x.shape, generator=torch.Generator().manual_seed(1))
    a = m.sample(cnet, noise, steps=6, cond=cond, guidance=2.5)
    b = m.sample(guided(cnet, 2.5), noise, steps=6, cond=cond)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, m.sample(cnet, noise, steps=6, cond=cond))


@pytest.mark.parametrize("kwargs", [dict(sigma_min=0.0), dict(sigma_max=-1.0), dict(sigma_min=90.0),
                                    dict(rho=0), dict(sigma_data=float("nan")), dict(P_mean="a")])
def test_bad_hyperparameters_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        EDM(**kwargs)


def test_model_configs_instantiate():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import genflow.config  # noqa: F401  (registers the ${knob:NAME,default} resolver the model files use)

    root = Path(__file__).resolve().parents[1] / "configs" / "model"
    edm = instantiate(OmegaConf.load(root / "edm.yaml"))
    assert type(edm) is EDM and edm.hparams() == EDM().hparams()
    for D, expect in [(2048, 2048.0), ("inf", math.inf), (None, 128.0)]:  # D=null: the model's default
        cfg = OmegaConf.merge(OmegaConf.create({"D": D}), OmegaConf.create({"model": OmegaConf.load(root / "pfgmpp.yaml")}))
        m = instantiate(cfg.model)
        assert isinstance(m, PFGMPP) and m.D == expect and m.sigma_max == 80.0 and m.rho == 7.0
        assert not m.allow_heavy_tails
    # the top-level opt-in (train.yaml's allow_heavy_tails) reaches the model
    cfg = OmegaConf.merge(OmegaConf.create({"D": 2, "allow_heavy_tails": True}),
                          OmegaConf.create({"model": OmegaConf.load(root / "pfgmpp.yaml")}))
    assert instantiate(cfg.model).allow_heavy_tails
