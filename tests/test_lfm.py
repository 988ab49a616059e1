"""Latent factor model (Chae et al. 2023) and the circle data: marginal likelihoods against closed forms,
the sampling/prior contract, and (slow) the manifold-overfitting regression (Loaiza-Ganem et al. 2022)."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from genflow.data.circle import (Circle, circle_frame, circle_log_density, sample_circle,
                                 uniform_circle_log_density)
from genflow.errors import ConfigError
from genflow.methods import LatentFactorModel

F64 = torch.float64


class CircleDecoder(torch.nn.Module):
    """g(z) = E (cos 2 pi z, sin 2 pi z): the uniform circle in R^D as a decoder with the net signature."""

    def __init__(self, D: int):
        super().__init__()
        self.frame = circle_frame(D)

    def forward(self, x, noise_label, cond=None):
        z = x[:, 0].to(F64)
        return (torch.stack([torch.cos(2 * math.pi * z), torch.sin(2 * math.pi * z)], 1) @ self.frame.T).to(x.dtype)


class LinearDecoder(torch.nn.Module):
    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = A

    def forward(self, x, noise_label, cond=None):
        return x @ self.A.T


def test_quadrature_marginal_is_the_bessel_density():
    """Uniform prior + circle decoder: p_{g,sigma} is the uniform circle convolved with N(0, sigma^2 I)."""
    method = LatentFactorModel(latent_dim=1, quadrature_nodes=512).double()
    y = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.8
    for sigma in (0.05, 0.2):
        torch.testing.assert_close(method.log_marginal(CircleDecoder(3), y, sigma),
                                   uniform_circle_log_density(y, sigma), atol=1e-8, rtol=0)


def test_normal_prior_quadrature_linear_gaussian():
    """g(z) = z e_1 with Z ~ N(0, 1): p = N(0, 1 + sigma^2) in coordinate 1, N(0, sigma^2) in coordinate 2.
    The equal-mass quantile rule converges like O(1/M) in the log-density; 4096 nodes give < 1e-3."""
    method = LatentFactorModel(latent_dim=1, prior="normal", quadrature_nodes=4096).double()
    A = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    y = torch.randn(20, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * torch.tensor([1.0, 0.3], dtype=F64)
    ref = (torch.distributions.Normal(0, math.sqrt(1 + 0.3 ** 2)).log_prob(y[:, 0])
           + torch.distributions.Normal(0, 0.3).log_prob(y[:, 1])).to(F64)
    torch.testing.assert_close(method.log_marginal(LinearDecoder(A), y, 0.3), ref, atol=1e-3, rtol=0)


def test_importance_sampling_marginal_d2():
    """d = 2: log (1/K) sum_k N(x; z_k, sigma^2) with z_k ~ N(0, I) against N(0, (1 + sigma^2) I); the
    estimator's spread over repeated draws bounds the tolerance (4 s.e. of the mean of 20 repeats)."""
    method = LatentFactorModel(latent_dim=2, prior="normal", importance_samples=4096).double()
    y = torch.randn(10, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = torch.distributions.Normal(0, math.sqrt(1 + 0.5 ** 2)).log_prob(y).sum(1).to(F64)
    torch.manual_seed(3)
    est = torch.stack([method.log_marginal(LinearDecoder(torch.eye(2, dtype=F64)), y, 0.5) for _ in range(20)])
    err = est.mean(0) - ref
    se = est.std(0) / math.sqrt(20)
    assert bool((err.abs() < 4 * se + 1e-3).all())  # + the O(1/K) Jensen bias, ~Var/(2K) < 1e-3


def test_loss_gradients_reach_sigma_and_decoder():
    from genflow.nets.mlp import MLP

    torch.manual_seed(0)
    net = MLP(data_shape=(2,), hidden=16, num_blocks=1)
    method = LatentFactorModel(quadrature_nodes=64)
    x = sample_circle(32, D=2, seed=0)
    loss = method.loss(net, x)
    assert loss.shape == (32,)
    loss.mean().backward()
    assert method.log_sigma.grad is not None and float(method.log_sigma.grad.abs()) > 0
    assert all(p.grad is not None for p in net.parameters())
    # sigma = 0 instance noise reproduces the unperturbed loss exactly (no hidden draw)
    from genflow.likelihood import add_instance_noise

    torch.testing.assert_close(method.loss(net, add_instance_noise(x, 0.0)), method.loss(net, x), atol=0, rtol=0)


def test_sampling_contract():
    method = LatentFactorModel(latent_dim=1)
    dec = CircleDecoder(3)
    z = method.prior_sample((500, 3), generator=torch.Generator().manual_seed(0))
    assert z.shape == (500, 3) and bool((z[:, 1:] == 0).all()) and 0 <= float(z.min()) and float(z.max()) <= 1
    x = method.sample(dec, z, steps=1)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(500), atol=1e-5, rtol=0)
    x2 = method.sample(dec, method.prior_sample((500, 3), generator=torch.Generator().manual_seed(0)), steps=7)
    torch.testing.assert_close(x, x2, atol=0, rtol=0)
    assert float(method.prior_log_prob(z).max()) == 0.0
    assert method.nfe(10) == 1
    with pytest.raises(ConfigError, match="no probability-flow ODE"):
        method.velocity(dec, z, torch.tensor(0.5))
    with pytest.raises(ConfigError, match="exceeds the data dimension"):
        LatentFactorModel(latent_dim=4).prior_sample((2, 3))
    noisy = LatentFactorModel(latent_dim=1, sigma_init=0.2, sample_noise=True)
    xn = noisy.sample(dec, z, steps=1, generator=torch.Generator().manual_seed(1))
    assert float((xn - x).std()) == pytest.approx(0.2, rel=0.1)


def test_bad_configs():
    with pytest.raises(ConfigError):
        LatentFactorModel(latent_dim=0)
    with pytest.raises(ConfigError):
        LatentFactorModel(prior="cauchy")
    with pytest.raises(ConfigError):
        LatentFactorModel(sigma_init=0.0)
    with pytest.raises(ConfigError):
        sample_circle(10, D=1)


def test_circle_data():
    x = sample_circle(4000, D=5, a=2.0, b=5.0, seed=0)
    assert x.shape == (4000, 5)
    torch.testing.assert_close(x, sample_circle(4000, D=5, a=2.0, b=5.0, seed=0), atol=0, rtol=0)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(4000), atol=1e-5, rtol=0)
    E = circle_frame(5)
    torch.testing.assert_close(E.T @ E, torch.eye(2, dtype=F64), atol=1e-12, rtol=0)
    p = x.to(F64) @ E
    u = torch.atan2(p[:, 1], p[:, 0]).remainder(2 * math.pi) / (2 * math.pi)
    mean, var = 2 / 7, 2 * 5 / (7 ** 2 * 8)  # Beta(2, 5)
    assert abs(float(u.mean()) - mean) < 4 * math.sqrt(var / 4000)
    dm = Circle(n=100, D=3, seed=0, val_fraction=0.2)
    assert dm.data_shape == (3,) and dm.val_tensor().shape == (20, 3) and dm.num_classes == 0


def test_instance_noise_fixed_perturbs_each_point_once():
    """Chae et al.: Y_i = X_i + s~ eps_i drawn once (``fixed``, the default); ``fresh`` redraws every batch."""
    dm = Circle(n=400, D=2, seed=3, val_fraction=0.0, instance_noise=0.1, batch_size=50)
    x, y = dm.train_tensor(), dm.fit_dataset().x
    assert dm.instance_noise_mode == "fixed" and torch.equal(dm.fit_dataset().x, y)   # the same every epoch
    eps = (y - x) / 0.1
    assert abs(float(eps.mean())) < 4 / math.sqrt(eps.numel()) and abs(float(eps.std()) - 1) < 4 / math.sqrt(2 * eps.numel())
    again = Circle(n=400, D=2, seed=3, val_fraction=0.0, instance_noise=0.1).fit_dataset().x
    assert torch.equal(again, y)                                                    # seeded: resumes and ranks agree
    batch = next(iter(dm.train_dataloader()))[0]
    assert all(bool((y == row).all(1).any()) for row in batch)                      # batches hold the fixed points
    fresh = Circle(n=400, D=2, seed=3, val_fraction=0.0, instance_noise=0.1, instance_noise_mode="fresh")
    assert torch.equal(fresh.fit_dataset().x, x)                                    # noise added per batch instead
    with pytest.raises(ConfigError, match="instance_noise_mode"):
        Circle(n=10, instance_noise_mode="sometimes")


def test_beta_circle_density_converges_and_integrates():
    """Quadrature over the Beta angle: the midpoint rule's O(1/M^2) error (the Beta(2, 5) density has a kink
    where the angle wraps) is below 1e-4 nats at 4096 nodes, and the density of the
    perturbed law integrates to 1 over the plane (Riemann sum on a grid)."""
    y = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(circle_log_density(y, 0.1, nodes=4096), circle_log_density(y, 0.1, nodes=8192),
                               atol=1e-4, rtol=0)
    g = torch.linspace(-1.6, 1.6, 129, dtype=F64)  # spacing 0.025 = sigma/4
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = circle_log_density(grid, 0.1, nodes=512).exp().sum() * (g[1] - g[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.slow
def test_manifold_overfitting_and_instance_noise():
    """Manifold overfitting (scaled to ~1 CPU-minute): plain MLE collapses sigma^ and misses the
    distribution on the circle; instance noise 0.05 reaches near the empirical floor. (The pilot's third
    reading, that the clean held-out likelihood prefers the broken model, did not reproduce reliably in
    our runs and is reported by scripts/circle_experiment.py rather than asserted.)"""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from circle_experiment import run

    torch.set_num_threads(1)
    res = run(n=100, D=2, noises=(0.0, 0.05), steps=4000, nodes=256, seed=1, n_test=2000, verbose=False)
    plain, noisy = res["rows"]
    assert plain["sigma_hat"] < 0.5 * noisy["sigma_hat"]  # measured 0.012 vs 0.053
    assert plain["sw2"] > 3 * noisy["sw2"]                # measured 26x
    assert noisy["sw2"] < 1.5 * res["sw2_floor"]          # measured 1.2x
