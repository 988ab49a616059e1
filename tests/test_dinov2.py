"""FD_DINOv2 (EDM2's metric): DINOv2 ViT-L/14 built by timm without weights, fed as EDM2 feeds it; weights
only from a local file (a clear error naming where it goes otherwise); the Fréchet distance against scipy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genflow.errors import ConfigError
from genflow.metrics.features import DINOV2_FILE, DINOv2Features, build_feature_extractor, dinov2_architecture
from genflow.metrics.fid import frechet_distance


def random_weights(seed: int = 0) -> dict:
    """Random weights for every tensor of ViT-L/14 (one seeded draw, cycled: drawing 300M numbers would
    dominate the test), LayerNorm scales around 1."""
    shapes = {k: v.shape for k, v in dinov2_architecture().state_dict().items()}
    base = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed))
    state = {}
    for i, (key, shape) in enumerate(shapes.items()):
        n = int(np.prod(shape))
        flat = base.roll(i * 7919)[: min(n, base.numel())].repeat((n + base.numel() - 1) // base.numel())[:n]
        state[key] = (1 + 0.1 * flat if key.endswith(("norm1.weight", "norm2.weight", "norm.weight"))
                      else 0.02 * flat).reshape(shape)
    return state


def test_missing_weights_name_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GENFLOW_DINOV2", raising=False)
    with pytest.raises(ConfigError) as err:
        build_feature_extractor("dinov2")
    message = str(err.value)
    assert str(tmp_path / "home" / DINOV2_FILE) in message and "fid.dinov2_path" in message
    assert "never downloads" in message
    bad = tmp_path / "small.safetensors"
    from safetensors.torch import save_file

    save_file({"pos_embed": torch.zeros(1, 5, 8)}, str(bad))
    with pytest.raises(ConfigError, match="do not fit ViT-L/14"):
        DINOv2Features(bad)


@pytest.mark.slow
def test_features_are_the_class_token_of_edm2s_preprocessing():
    """One 8x8 image through the extractor: the network sees exactly EDM2's input (uint8 as PNGs store it,
    bicubic antialiased resize to 224, [0, 1], ImageNet mean/std), and the features are the class token of the
    final normed tokens (1024-d)."""
    ext = DINOv2Features(random_weights())
    seen = {}
    forward_features = ext.model.forward_features

    def record(x, **kwargs):
        seen["input"] = x
        seen["tokens"] = forward_features(x, **kwargs)
        return seen["tokens"]

    ext.model.forward_features = record
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    features = ext(images)
    u8 = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).float()
    x = F.interpolate(u8, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen["input"], x, atol=1e-5)
    assert seen["tokens"].shape == (1, 1 + 16 * 16, 1024)  # class token + 16x16 patches of 14 px
    assert features.shape == (1, 1024) and torch.equal(features, seen["tokens"][:, 0])
    norm = ext.model.norm
    assert torch.allclose(seen["tokens"].mean(-1), norm.bias.mean().expand(1, 257), atol=0.1)  # normed tokens
    assert ext.fingerprint().startswith("dinov2-")


def test_frechet_distance_matches_an_independent_computation():
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with scipy's matrix square root, on 1024-d-like
    features of two different laws (64-d here)."""
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 64))
    b = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))
    got = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    assert got == pytest.approx(want, rel=1e-9)
