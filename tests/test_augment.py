"""EDM's non-leaky augmentation pipe: exact pixel operations, label layout, probabilities, statistics."""
import math

import pytest
import torch

from genflow.data.augment import AugmentPipe
from genflow.errors import ConfigError

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = 1e-5  # "exact": grid_sample at integer coordinates, up to float rounding of the affine grid


def _imgs(b=4, c=3, h=12, w=10, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)).to(DEV)


def _full(b, **values):
    return {k: torch.full((b,), float(v), device=DEV) for k, v in values.items()}


def _smooth_field(b, c, h, w, corr, seed):
    """Stationary Gaussian random field: periodic white noise filtered with a Gaussian spectrum, unit variance."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b, c, h, w, generator=g)
    fy, fx = torch.fft.fftfreq(h)[:, None], torch.fft.fftfreq(w)[None, :]
    spec = torch.exp(-2 * (math.pi * corr) ** 2 * (fx ** 2 + fy ** 2))
    field = torch.fft.ifft2(torch.fft.fft2(noise) * spec).real
    return field / field.std()


def test_p_zero_is_identity_and_labels_zero():
    x = _imgs()
    pipe = AugmentPipe.edm(0.0)
    y, lab = pipe(x)
    assert y is x
    assert lab.shape == (4, 9) and lab.device == x.device and not lab.any()


def test_edm_label_layout():
    pipe = AugmentPipe.edm(0.12)
    assert pipe.label_dim == 9
    assert pipe.label_names == ("xflip", "yflip", "scale", "rotate_cos_m1", "rotate_sin", "aniso_cos", "aniso_sin",
                                "translate_x", "translate_y")
    assert AugmentPipe(0.5, xflip=1, translate_frac=1).label_dim == 3


def test_xflip_only_flips_exactly_with_label():
    x = _imgs(b=256)
    y, lab = AugmentPipe(1.0, xflip=1)(x, generator=torch.Generator(DEV).manual_seed(1))
    assert lab.shape == (256, 1)
    flipped = lab[:, 0] == 1
    assert torch.equal(y[flipped], x[flipped].flip(3))
    assert torch.equal(y[~flipped], x[~flipped])
    assert set(lab[:, 0].tolist()) == {0.0, 1.0}


def test_integer_translation_is_exact_shift_with_reflect_border():
    x = _imgs(h=16, w=12)
    pipe = AugmentPipe(1.0, translate_frac=1)
    # label units: translate_frac_std * size pixels per unit -> (+3, -2) pixels
    params = _full(4, translate_x=3 / (12 * 0.125), translate_y=-2 / (16 * 0.125))
    y = pipe.apply(x, params)
    torch.testing.assert_close(y[..., 0:14, 3:], x[..., 2:16, :9], atol=EXACT, rtol=0)
    # EDM pads by reflection about the edge pixel (no repeat): column j < 3 reads source column 3 - j
    torch.testing.assert_close(y[..., 0:14, 0], x[..., 2:16, 3], atol=EXACT, rtol=0)
    torch.testing.assert_close(y[..., 0:14, 1], x[..., 2:16, 2], atol=EXACT, rtol=0)
    lab = pipe.labels(params)
    torch.testing.assert_close(lab, torch.tensor([[2.0, -1.0]], device=DEV).expand(4, 2))


@pytest.mark.parametrize("k", [1, 2, 3, -1])
def test_quarter_turns_are_exact(k):
    x = _imgs(h=10, w=10)
    pipe = AugmentPipe(1.0, rotate_frac=1)
    params = _full(4, rotate=k * math.pi / 2)
    y = pipe.apply(x, params)
    # +90 deg in (x right, y down) pixel coordinates, the label's convention: out[i, j] = x[j, W-1-i]
    expected = {1: x.flip(3).transpose(2, 3), 2: x.flip(2).flip(3), 3: x.transpose(2, 3).flip(3),
                -1: x.transpose(2, 3).flip(3)}[k]
    torch.testing.assert_close(y, expected, atol=EXACT, rtol=0)
    lab = pipe.labels(params)
    angle = k * math.pi / 2
    torch.testing.assert_close(lab[0], torch.tensor([math.cos(angle) - 1, math.sin(angle)], device=DEV))


def test_source_map_matches_closed_form():
    pipe = AugmentPipe.edm(1.0)
    params = _full(1, scale=1.0, rotate=0.3, aniso=-0.7, aniso_angle=0.4, translate_x=0.5, translate_y=-1.0)
    m, t = pipe.source_map(params, 16, 20)

    def rot(a):
        return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    s, a = 2 ** 0.2, 2 ** (-0.7 * 0.2)
    fwd = rot(0.4).T @ torch.diag(torch.tensor([a, 1 / a])) @ rot(0.4)  # stretch along the axis at angle 0.4
    forward = fwd @ rot(-0.3) @ (s * torch.eye(2))  # zoom, then rotate, then stretch (source -> output)
    torch.testing.assert_close(m[0].cpu(), torch.linalg.inv(forward), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(t[0].cpu(), torch.tensor([0.5 * 20 * 0.125, -16 * 0.125]))
    lab = pipe.labels(params)[0].cpu()
    want = [0, 0, 1.0, math.cos(0.3) - 1, math.sin(0.3), -0.7 * math.cos(0.4), -0.7 * math.sin(0.4), 0.5, -1.0]
    torch.testing.assert_close(lab, torch.tensor(want), atol=1e-6, rtol=1e-5)


def test_general_affine_on_non_square_images_matches_source_map():
    """Bilinear sampling reproduces a linear ramp exactly, so out(p) = ramp(M (p - t)) wherever the source is inside."""
    h, w = 12, 20
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = (0.07 * jj - 0.11 * ii + 0.2)[None, None].to(DEV)
    pipe = AugmentPipe.edm(1.0, interpolation="bilinear")
    params = _full(1, scale=0.5, rotate=0.35, aniso=1.0, aniso_angle=-0.6, translate_x=0.3, translate_y=-0.4)
    y = pipe.apply(ramp, params)[0, 0].cpu()
    m, t = pipe.source_map(params, h, w)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    dst = torch.stack([jj - cx, ii - cy], -1)                                # (h, w, 2) centred (x, y)
    src = (dst - t[0].cpu()) @ m[0].cpu().T + torch.tensor([cx, cy])
    inside = (src[..., 0] >= 0) & (src[..., 0] <= w - 1) & (src[..., 1] >= 0) & (src[..., 1] <= h - 1)
    assert inside.sum() > 60
    expected = 0.07 * src[..., 0] - 0.11 * src[..., 1] + 0.2
    torch.testing.assert_close(y[inside], expected[inside], atol=1e-5, rtol=0)


def test_unaugmented_rows_have_zero_labels_and_are_untouched():
    x = _imgs(b=512, c=1, h=8, w=8)
    y, lab = AugmentPipe.edm(0.2)(x, generator=torch.Generator(DEV).manual_seed(3))
    geo = lab[:, 2:].ne(0).any(1)
    flips = lab[:, :2]
    plain = ~geo & flips.eq(0).all(1)
    assert plain.sum() > 40 and (~plain).sum() > 40  # expected 94 plain rows of 512
    assert torch.equal(y[plain], x[plain])
    # rows with only an x-flip are exact mirrors
    only_x = ~geo & flips[:, 0].eq(1) & flips[:, 1].eq(0)
    assert torch.equal(y[only_x], x[only_x].flip(3))
    # a geometric label column is zero exactly when its transform was not drawn (cos-1 and sin together)
    assert torch.equal(lab[:, 3].ne(0), lab[:, 4].ne(0))
    assert torch.equal(lab[:, 7].ne(0), lab[:, 8].ne(0))


@pytest.mark.parametrize("p", [0.12, 0.5])
def test_application_rates_match_p(p):
    n = 40_000
    pipe = AugmentPipe.edm(p)
    params = pipe.sample_params(n, DEV, torch.Generator(DEV).manual_seed(7))
    lab = pipe.labels(params)

    def check(frac_observed, expected):
        se = math.sqrt(expected * (1 - expected) / n)
        assert abs(frac_observed - expected) < 5 * se, (frac_observed, expected, se)

    check(lab[:, 0].mean().item(), 0.5)                       # xflip=1e8: always drawn, flip half the time
    check(lab[:, 1].mean().item(), p / 2)                     # yflip: drawn with p, flip half the time
    check(lab[:, 2].ne(0).float().mean().item(), p)           # scale
    check(lab[:, 4].ne(0).float().mean().item(), p)           # rotation
    check(lab[:, 5].ne(0).float().mean().item(), p)           # aniso (w cos r)
    check(lab[:, 6].ne(0).float().mean().item(), p / 2)       # aniso axis tilted with prob 1/2
    check(lab[:, 7].ne(0).float().mean().item(), p)           # translation (one draw for x and y)
    applied = lab[:, 2] != 0
    w = lab[applied, 2]
    # the applied scale parameters are standard normal: mean 0 +- 5 SE, variance 1 +- 5 SE
    assert abs(w.mean().item()) < 5 / math.sqrt(w.numel())
    assert abs(w.var().item() - 1) < 5 * math.sqrt(2 / w.numel())
    rot = torch.atan2(lab[lab[:, 4] != 0, 4], lab[lab[:, 4] != 0, 3] + 1)
    # rotation angles uniform on (-pi, pi): variance pi^2 / 3
    assert abs(rot.var().item() - math.pi ** 2 / 3) < 5 * math.sqrt(4 / 45) * math.pi ** 2 / math.sqrt(rot.numel())


def test_deterministic_with_generator():
    x = _imgs(b=16)
    pipe = AugmentPipe.edm(0.5)
    y1, l1 = pipe(x, generator=torch.Generator(DEV).manual_seed(11))
    y2, l2 = pipe(x, generator=torch.Generator(DEV).manual_seed(11))
    y3, l3 = pipe(x, generator=torch.Generator(DEV).manual_seed(12))
    assert torch.equal(y1, y2) and torch.equal(l1, l2)
    assert not torch.equal(l1, l3)


# bicubic (Keys, a = -0.75) across a -1 -> 1 step rings by 2 * 0.094 at a half-pixel offset: 1.19 in 1-D
@pytest.mark.parametrize("interpolation,limit", [("bicubic", 1.3), ("bilinear", 1.0 + 1e-6)])
def test_pixel_range_roughly_preserved(interpolation, limit):
    # a smooth random image squashed into [-1, 1]: saturated regions with soft edges, like natural images
    x = torch.tanh(2 * _smooth_field(64, 3, 32, 32, corr=2.0, seed=5)).to(DEV)
    y, _ = AugmentPipe.edm(1.0, interpolation=interpolation)(x, generator=torch.Generator(DEV).manual_seed(5))
    # bilinear is a convex combination; bicubic (like EDM's wavelet filter) may ring a little at edges
    assert y.abs().max().item() <= limit
    assert (y.abs() > 1.05).float().mean().item() < 0.01  # measured: 0.7 % (bicubic), 0 (bilinear)


def test_stationary_field_statistics_are_kept():
    """Non-leaky intent: on a stationary field augmentation changes neither mean nor variance, anywhere."""
    b = 2048
    x = (0.5 * _smooth_field(b, 1, 16, 16, corr=1.5, seed=9) + 0.1).to(DEV)
    y, lab = AugmentPipe.edm(1.0)(x, generator=torch.Generator(DEV).manual_seed(9))
    assert lab[:, 2:].ne(0).any(1).all()
    # per-image means are correlated over the 16x16 pixels: an SE from the spread of the image means
    se_mean = x.mean((1, 2, 3)).std().item() / math.sqrt(b)
    assert abs(y.mean().item() - x.mean().item()) < 5 * se_mean
    # the same images resampled: the variance ratio is not sampling noise but interpolation gain/loss
    # (bicubic, corr 1.5 px: +1.4 %; bilinear would lose 7 %)
    ratio = y.var().item() / x.var().item()
    assert 0.97 < ratio < 1.04, ratio
    # no position bias: the pixel-wise variance map is flat to 5 SE of a Gaussian variance estimate,
    # and the border (where reflection supplies the samples) matches the interior to 5 %
    vmap = y.var(0)[0] / x.var().item()
    se_var = math.sqrt(2 / (b - 1))
    assert (vmap - ratio).abs().max().item() < 5 * se_var
    border = torch.cat([vmap[0], vmap[-1], vmap[1:-1, 0], vmap[1:-1, -1]]).mean()
    assert abs(border.item() / vmap[4:-4, 4:-4].mean().item() - 1) < 0.05


def test_gradient_free_on_device_and_dtype():
    x = _imgs(b=8).requires_grad_(True)
    y, lab = AugmentPipe.edm(0.5)(x)
    assert not y.requires_grad and y.device == x.device and lab.device == x.device
    assert y.dtype == x.dtype and lab.dtype == torch.float32


def test_bad_input_is_rejected():
    with pytest.raises(ConfigError, match="augment_p"):
        AugmentPipe.edm(1.5)
    with pytest.raises(ConfigError, match="interpolation"):
        AugmentPipe.edm(0.1, interpolation="lanczos")
    with pytest.raises(ConfigError, match="B, C, H, W"):
        AugmentPipe.edm(0.1)(torch.zeros(4, 2))


def test_datamodule_wiring():
    """augment_p > 0 adds cond['augment'] to training batches only; augment_p = 0 leaves batches alone."""
    from types import SimpleNamespace

    from genflow.data import Digits

    x = torch.rand(8, 1, 8, 8) * 2 - 1
    cond = {"class": torch.eye(10)[:8]}
    dm = Digits(batch_size=8, augment_p=1.0)
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    y, c = dm.on_after_batch_transfer((x, cond), 0)
    assert c["augment"].shape == (8, 9) and torch.equal(c["class"], cond["class"]) and "augment" not in cond
    assert not torch.equal(y, x)
    dm.trainer = SimpleNamespace(training=False)
    y, c = dm.on_after_batch_transfer((x, cond), 0)
    assert y is x and "augment" not in c
    off = Digits(batch_size=8)
    off.trainer = SimpleNamespace(training=True)
    y, c = off.on_after_batch_transfer((x, cond), 0)
    assert y is x and "augment" not in c
    with pytest.raises(ConfigError, match="augment_p"):
        Digits(augment_p=-0.1)
