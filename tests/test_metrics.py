"""Fréchet distance, running statistics, KID, feature extractors and reference-statistics caching."""

import numpy as np
import pytest
import torch
from torch import nn

from genflow.errors import ConfigError
from genflow.metrics import (
    FeatureStats,
    InceptionFeatures,
    ModuleFeatures,
    build_feature_extractor,
    fid_from_features,
    frechet_distance,
    kernel_distance,
    load_reference,
    reference_stats,
    resolve_inception_path,
)
from genflow.metrics.features import INCEPTION_FILE
from genflow.sampling import to_uint8


def _random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_fd_of_a_gaussian_with_itself_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=32), _random_spd(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_fd_matches_closed_forms():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # isotropic: ||dmu||^2 + d (s1 - s2)^2
    s1, s2 = 0.7, 1.9
    fd = frechet_distance(mu1, s1**2 * np.eye(d), mu2, s2**2 * np.eye(d))
    assert fd == pytest.approx(np.sum((mu1 - mu2) ** 2) + d * (s1 - s2) ** 2, rel=1e-12)
    # commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    fd = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fd == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)
    # same covariance rotated: equal means -> 2 Tr(S) - 2 Tr((S Q S Q^T)^{1/2}), checked via scipy eigenvalues
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = np.diag(a)
    s_rot = q @ s @ q.T
    import scipy.linalg

    expected = 2 * np.trace(s) - 2 * np.trace(scipy.linalg.sqrtm(s @ s_rot).real)
    assert frechet_distance(mu1, s, mu1, s_rot) == pytest.approx(expected, rel=1e-9)


def test_fd_equals_cleanfid_and_accepts_tensors():
    from cleanfid.fid import frechet_distance as cleanfid_fd

    rng = np.random.default_rng(2)
    for d, n in [(8, 50), (64, 300), (256, 200)]:  # the last has n < d: singular covariances
        f1, f2 = rng.normal(size=(n, d)), 1.3 * rng.normal(size=(n, d)) + 0.2
        m1, c1, m2, c2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
        ours = frechet_distance(m1, c1, m2, c2)
        ref = cleanfid_fd(m1, c1, m2, c2)
        assert abs(ours - ref) < 1e-6 * max(1.0, abs(ref))
        as_tensors = frechet_distance(*(torch.from_numpy(v).float() for v in (m1, c1, m2, c2)))
        assert as_tensors == pytest.approx(ref, rel=1e-4)


def test_fd_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_stats_equal_batch_stats_and_merge():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1000, 12, generator=g) * torch.linspace(0.5, 2, 12) + 3.0
    stats = FeatureStats()
    for chunk in f.split(37):
        stats.update(chunk)
    assert stats.n == 1000
    torch.testing.assert_close(stats.mean, f.double().mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.cov, torch.cov(f.double().T), rtol=1e-10, atol=1e-10)
    mu, sigma = stats.stats()
    assert isinstance(mu, np.ndarray) and mu.dtype == np.float64 and sigma.shape == (12, 12)


def test_feature_stats_reduce_over_ranks_as_one_process():
    """FeatureStats is a torchmetrics Metric: syncing it over "two ranks" holding the same features
    (an in-process gather that returns each state twice) sums the float64 sums and concatenates the
    kept features, so its statistics and Fréchet distance are those of one process that saw both."""
    from torchmetrics import Metric

    g = torch.Generator().manual_seed(2)
    f = torch.randn(60, 5, generator=g) * torch.linspace(0.5, 2, 5) + 1.0
    stats = FeatureStats(keep_features=100)
    for chunk in f.split(17):
        stats.update(chunk)
    assert isinstance(stats, Metric)
    mean, cov = stats.compute()
    assert torch.equal(mean, stats.mean) and torch.equal(cov, stats.cov)
    both = FeatureStats()
    both.update(torch.cat([f, f]))
    mu_ref, sigma_ref = np.zeros(5), np.eye(5)
    with stats.sync_context(dist_sync_fn=lambda t, group=None: [t, t], distributed_available=lambda: True):
        assert stats.n == 120
        torch.testing.assert_close(stats.mean, both.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.cov, both.cov, rtol=1e-12, atol=1e-12)
        assert stats.frechet_distance(mu_ref, sigma_ref) == pytest.approx(both.frechet_distance(mu_ref, sigma_ref),
                                                                            rel=1e-12)
        assert torch.equal(stats.kept_features(), torch.cat([f, f]))
    assert stats.n == 60  # the context restores this rank's own sums
    stats.reset()
    assert stats.n == 0 and stats.kept_features().shape == (0, 5)
    stats.update(f[:3])
    assert torch.equal(stats.kept_features(), f[:3])


def test_kid_matches_cleanfid_and_separates_distributions():
    from cleanfid.fid import kernel_distance as cleanfid_kid

    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 0.3
    # one subset as large as both sets: the draw is a permutation, to which MMD is invariant
    ours = kernel_distance(f1, f2, num_subsets=1, max_subset_size=200)
    assert ours == pytest.approx(cleanfid_kid(f1, f2, num_subsets=1, max_subset_size=200), rel=1e-10)
    same = kernel_distance(f1[:100], f1[100:], num_subsets=20, max_subset_size=100)
    assert abs(same) < ours / 5


def _images(n=6, c=3, seed=0):
    return torch.rand(n, c, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_inception_torchscript_legacy_tensorflow_path(standin_inception):
    path, scripted = standin_inception
    ext = InceptionFeatures(path, mode="legacy_tensorflow")
    x = _images()
    feats = ext(x)
    assert feats.shape == (6, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, scripted(to_uint8(x).float(), return_features=True))
    # one-channel images are repeated to three channels
    torch.testing.assert_close(ext(x[:, :1]), ext(x[:, :1].expand(-1, 3, -1, -1)))


def test_inception_clean_mode_equals_cleanfid_pipeline(standin_inception):
    """Our threaded clean-mode extraction equals clean-fid's own get_model_features loop."""
    from cleanfid.fid import get_model_features
    from cleanfid.inception_torchscript import InceptionV3W

    path, _ = standin_inception
    ext = build_feature_extractor("inception", mode="clean", inception_path=path.parent)
    x = _images(4)
    u8 = to_uint8(x).float()
    model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    theirs = get_model_features(lambda z: u8, model, mode="clean", z_dim=1, num_gen=4, batch_size=4,
                                device=torch.device("cpu"), verbose=False)
    torch.testing.assert_close(ext(x), torch.from_numpy(theirs), rtol=1e-5, atol=1e-5)
    assert ext.fingerprint().startswith("inception-clean-")


def test_inception_file_with_other_name_is_accepted(standin_inception, tmp_path):
    path, scripted = standin_inception
    other = tmp_path / "my-inception.pt"
    other.write_bytes(path.read_bytes())
    x = _images(2)
    ext = InceptionFeatures(other, mode="legacy_tensorflow")
    torch.testing.assert_close(ext(x), scripted(to_uint8(x).float(), return_features=True))


def test_missing_inception_weights_is_a_clear_error(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.delenv("GENFLOW_INCEPTION", raising=False)
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        resolve_inception_path(tmp_path / "nowhere" / INCEPTION_FILE)
    msg = str(err.value)
    assert INCEPTION_FILE in msg and "nvlabs-fi-cdn.nvidia.com" in msg and "fid.download=true" in msg
    with pytest.raises(ConfigError, match="fid.mode"):
        InceptionFeatures(mode="bilinear")


def test_module_extractor_and_reference_cache(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8))
    ext = build_feature_extractor(net)
    assert isinstance(ext, ModuleFeatures)
    images = _images(50)
    ref = reference_stats(ext, images, dataset="toy", split="train", directory=tmp_path, batch_size=16)
    files = list(tmp_path.glob("toy_train_3x32x32_*.npz"))
    assert len(files) == 1 and ref.n == 50
    # The same float32 features, chunked as reference_stats chunks them (16): a float32 matmul over another
    # batch size may round differently (BLAS blocking), so only the float64 statistics are compared tightly.
    direct = torch.cat([ext(chunk) for chunk in images.split(16)]).double()
    np.testing.assert_allclose(ref.mu, direct.mean(0).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.sigma, torch.cov(direct.T).numpy(), rtol=1e-8, atol=1e-12)
    # ... and those features are the network's: within float32 rounding of a 3072-term dot product
    # (|fl(w.x + b) - (w.x + b)| <= gamma_K (|w|.|x| + |b|), gamma_K = K u / (1 - K u)), in any order
    exact = net.double()(images.double()).detach()
    K, u = 3 * 32 * 32, 2.0 ** -24
    bound = K * u / (1 - K * u) * (images.double().flatten(1).abs() @ net[1].weight.abs().T + net[1].bias.abs())
    assert ((direct - exact).abs() <= bound + u * exact.abs()).all()
    net.float()
    # second call hits the cache; other content gets another key
    again = reference_stats(ext, images, dataset="toy", split="train", directory=tmp_path)
    assert again.source == str(files[0])
    reference_stats(ext, images[:40], dataset="toy", split="train", directory=tmp_path)
    assert len(list(tmp_path.glob("toy_train_*.npz"))) == 2
    # FID against the cached reference equals FID from raw features
    other = _images(50, seed=1)
    stats = FeatureStats()
    stats.update(ext(other))
    assert stats.frechet_distance(ref.mu, ref.sigma) == pytest.approx(
        fid_from_features(ext(other), direct), rel=1e-9)


def test_edm_and_cleanfid_style_npz_references(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.normal(size=5), _random_spd(rng, 5)
    np.savez(tmp_path / "cifar10-32x32.npz", mu=mu, sigma=sigma)  # EDM layout
    ref = load_reference(tmp_path / "cifar10-32x32.npz")
    np.testing.assert_array_equal(ref.mu, mu)
    with pytest.raises(ConfigError, match="not found"):
        load_reference(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="clean-fid"):
        load_reference("cleanfid:nonexistent_clean_train_32")
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ConfigError, match="mu/sigma"):
        load_reference(tmp_path / "bad.npz")
