"""Scheduler conformance (the affine Gaussian paths of Lipman et al. 2023 and Shaul et al. 2023) and the interpolation helpers."""
import math

import pytest
import torch
from scipy.interpolate import PchipInterpolator

from genflow.errors import ConfigError
from genflow.methods import CondOT, Cosine, KineticOptimal, SchedulerOutput, VP
from genflow.methods.paths import make_scheduler
from genflow.methods.splines import hermite, pchip_slopes

from gauss_lambda import GaussLambda

F64 = torch.float64


def ko_analytic(t_eps=1e-4):
    return KineticOptimal.from_separation(None, GaussLambda([0.5, 1.5]), t_eps=t_eps)


SCHEDULERS = {"condot": CondOT, "cosine": Cosine, "vp": VP, "ko": ko_analytic}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_conformance(name):
    sch = SCHEDULERS[name]()
    out = sch(torch.tensor([0.0, 1.0], dtype=F64))
    assert isinstance(out, SchedulerOutput)
    if name == "vp":  # alpha_0 = exp(-beta_min/4 - beta_max/4 ...) ~ 0.0064, t clamped at 1 - 1e-5
        assert out.alpha_t[0] == pytest.approx(math.exp(-0.25 * (20 - 0.1) - 0.5 * 0.1), rel=1e-9)
        assert out.sigma_t[1] < 2e-3 and out.alpha_t[1] == pytest.approx(1, abs=1e-5)
    else:
        torch.testing.assert_close(out.alpha_t, torch.tensor([0.0, 1.0], dtype=F64), atol=1e-12, rtol=0)
        torch.testing.assert_close(out.sigma_t, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    # derivatives agree with central differences of the values (away from KO's start chord at 1e-4)
    t = torch.linspace(0.01, 0.99, 197, dtype=F64)
    h = 1e-6
    o, hi, lo = sch(t), sch(t + h), sch(t - h)
    torch.testing.assert_close(o.d_alpha_t, (hi.alpha_t - lo.alpha_t) / (2 * h), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(o.d_sigma_t, (hi.sigma_t - lo.sigma_t) / (2 * h), atol=2e-5, rtol=1e-5)
    # SNR strictly increasing and inverted by snr_inverse; nothing blows up on [eps, 1 - eps]
    tt = torch.linspace(1e-6, 1 - 1e-6, 2001, dtype=F64)
    oo = sch(tt)
    assert all(torch.isfinite(v).all() for v in (oo.alpha_t, oo.sigma_t, oo.d_alpha_t, oo.d_sigma_t))
    snr = oo.alpha_t / oo.sigma_t
    assert (snr[1:] > snr[:-1]).all()
    inner = tt[(tt > 0.001) & (tt < 0.999)] if name == "vp" else tt
    back = sch.snr_inverse(sch(inner).alpha_t / sch(inner).sigma_t)
    torch.testing.assert_close(back, inner, atol=1e-7, rtol=0)
    # float32 in, float32 out
    assert sch(torch.rand(4)).alpha_t.dtype == torch.float32


def test_snr_inverse_handles_infinity():
    for sch in (CondOT(), Cosine(), ko_analytic()):
        assert float(sch.snr_inverse(torch.tensor([math.inf], dtype=F64))) == pytest.approx(1.0, abs=1e-9)


def test_pchip_matches_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.cumsum(torch.rand(12, generator=g, dtype=F64) + 0.1, 0)
    y = torch.cumsum(torch.rand(12, generator=g, dtype=F64) ** 3, 0)
    xq = torch.linspace(float(x[0]), float(x[-1]), 301, dtype=F64)
    val, der = hermite(x, y, pchip_slopes(x, y), xq)
    ref = PchipInterpolator(x.numpy(), y.numpy())
    torch.testing.assert_close(val, torch.from_numpy(ref(xq.numpy())), atol=1e-12, rtol=0)
    torch.testing.assert_close(der, torch.from_numpy(ref(xq.numpy(), 1)), atol=1e-10, rtol=0)
    assert (val[1:] >= val[:-1] - 1e-15).all()


def test_ko_state_dict_restores_without_data():
    ko = ko_analytic()
    fresh = KineticOptimal()
    with pytest.raises(ConfigError, match="no table"):
        fresh(torch.tensor([0.5]))
    fresh.load_state_dict(ko.state_dict())
    t = torch.rand(50, dtype=F64)
    torch.testing.assert_close(fresh(t).alpha_t, ko(t).alpha_t, atol=0, rtol=0)
    torch.testing.assert_close(fresh(t).d_sigma_t, ko(t).d_sigma_t, atol=0, rtol=0)


def test_unknown_path_is_a_config_error():
    with pytest.raises(ConfigError, match="condot"):
        make_scheduler("straight")
    with pytest.raises(ConfigError):
        VP(beta_min=1.0, beta_max=0.5)
