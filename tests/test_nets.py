"""Backbones: EDM parameter parity, shapes, conditioning, attention, resampling, errors, determinism."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genflow.errors import ConfigError
from genflow.nets import MLP, PRESETS, UNet
from genflow.nets.layers import Attention, Conv2d, FourierEmbedding, PositionalEmbedding, UNetBlock, downsample2d, upsample2d


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def perturb_(net, scale=0.05, seed=0):
    """Near-zero-initialised output layers would hide most paths; give every weight a real value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


# Counts of NVlabs/edm SongUNet (training/networks.py) built with the same arguments (augment_dim=9),
# unconditional and with a 10-class label map (Linear(10, noise_channels) with bias).
EDM_COUNTS = {
    ("ddpmpp_cifar10", (3, 32, 32)): (55_733_891, 55_735_299),
    ("ncsnpp_cifar10", (3, 32, 32)): (56_397_827, 56_400_643),
    ("ddpmpp_ffhq64", (3, 64, 64)): (61_805_571, 61_806_979),
}


@pytest.mark.parametrize("preset,shape", list(EDM_COUNTS))
def test_paper_presets_match_edm_parameter_counts(preset, shape):
    uncond, cond = EDM_COUNTS[(preset, shape)]
    with torch.device("meta"):
        assert n_params(UNet(data_shape=shape, preset=preset)) == uncond
        assert n_params(UNet(data_shape=shape, num_classes=10, preset=preset)) == cond
    # the label map is Linear(K, noise_channels): NCSN++ has a 2x wider noise embedding
    noise_ch = 128 * (2 if preset.startswith("ncsnpp") else 1)
    assert cond - uncond == 10 * noise_ch + noise_ch
    assert round(uncond / 1e6, 2) == {"ddpmpp_cifar10": 55.73, "ncsnpp_cifar10": 56.40, "ddpmpp_ffhq64": 61.81}[preset]


def test_small_presets_sizes():
    assert 10_000 < n_params(UNet(data_shape=(1, 8, 8), preset="unet_tiny")) < 300_000
    with torch.device("meta"):
        assert n_params(UNet(data_shape=(1, 8, 8), preset="unet_digits")) < 6_000_000
        assert n_params(UNet(data_shape=(3, 32, 32), preset="unet_small")) < 10_000_000
    assert set(PRESETS) >= {"ddpmpp_cifar10", "ncsnpp_cifar10", "ddpmpp_ffhq64", "unet_tiny", "unet_digits", "unet_small"}


TINY = dict(model_channels=16, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1, dropout=0.0)


@pytest.mark.parametrize(
    "shape,kw",
    [
        ((1, 8, 8), dict(preset="unet_tiny")),
        ((3, 16, 16), dict(TINY, channel_mult=(1, 2, 2), attn_resolutions=(8,))),
        ((2, 8, 16), dict(TINY, attn_resolutions=(4,))),  # rectangular
        ((3, 16, 16), dict(TINY, attn_resolutions=(8,), embedding_type="fourier", channel_mult_noise=2,
                           encoder_type="residual", resample_filter=(1, 3, 3, 1))),  # NCSN++ style
        ((1, 8, 8), dict(TINY, attn_resolutions=(8,), encoder_type="skip", decoder_type="skip")),
        ((1, 8, 8), dict(TINY, attn_resolutions=(4,), augment_dim=9, adaptive_scale=False)),
    ],
)
def test_unet_output_shapes(shape, kw):
    torch.manual_seed(0)
    num_classes = 3 if sum(shape) % 2 else 0  # alternate conditional / unconditional cases
    net = UNet(data_shape=shape, num_classes=num_classes, **kw)
    x = torch.randn(5, *shape)
    cond = {"class": F.one_hot(torch.arange(5) % 3, 3).float()} if num_classes else None
    out = net(x, torch.randn(5), cond)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    # a 0-dim noise label is broadcast; float64 labels (flow time) are accepted
    assert net(x, torch.tensor(0.3, dtype=torch.float64), cond).shape == x.shape


def test_mlp_shapes_and_conditioning():
    torch.manual_seed(0)
    net = perturb_(MLP(data_shape=(2,), num_classes=4, hidden=32, num_blocks=2, emb_channels=16))
    x = torch.randn(7, 2)
    onehot = F.one_hot(torch.arange(7) % 4, 4).float()
    out = net(x, torch.rand(7), {"class": onehot})
    assert out.shape == (7, 2)
    assert not torch.allclose(out, net(x, torch.rand(7), None))  # class changes the output
    with pytest.raises(ConfigError):
        MLP(data_shape=(1, 8, 8))
    with pytest.raises(ConfigError):
        UNet(data_shape=(2,))


@pytest.mark.parametrize("make", ["unet", "mlp"])
def test_label_dropout_train_vs_eval(make):
    torch.manual_seed(0)
    if make == "unet":
        net = UNet(data_shape=(1, 8, 8), num_classes=3, preset="unet_tiny", label_dropout=0.3)
        x = torch.randn(1, 1, 8, 8).expand(400, 1, 8, 8)
    else:
        net = MLP(data_shape=(3,), num_classes=3, hidden=16, num_blocks=1, emb_channels=8, label_dropout=0.3)
        x = torch.randn(1, 3).expand(400, 3)
    perturb_(net, 0.2)
    t = torch.full((400,), 0.1)
    onehot = F.one_hot(torch.full((400,), 1), 3).float()
    net.eval()
    with torch.no_grad():
        cond_out = net(x, t, {"class": onehot})
        null_out = net(x, t, {"class": torch.zeros_like(onehot)})
        assert torch.equal(net(x, t, {"class": onehot}), cond_out)  # eval: never dropped
        net.train()
        torch.manual_seed(1)
        train_out = net(x, t, {"class": onehot})
    dims = tuple(range(1, x.ndim))
    is_cond = (train_out - cond_out).abs().amax(dims) < 1e-5
    is_null = (train_out - null_out).abs().amax(dims) < 1e-5
    assert (cond_out - null_out).abs().amax(dims).min() > 1e-3
    assert torch.all(is_cond ^ is_null), "each sample is either kept or dropped as a whole"
    frac = is_null.float().mean().item()
    se = math.sqrt(0.3 * 0.7 / 400)
    assert abs(frac - 0.3) < 4 * se


def test_bad_resolution_is_a_config_error():
    with pytest.raises(ConfigError, match=r"2\^2 = 4") as err:
        UNet(data_shape=(1, 6, 6), channel_mult=(1, 2, 2), attn_resolutions=(3,))
    assert "at most 2 entries" in str(err.value)
    with pytest.raises(ConfigError, match="never reaches"):
        UNet(data_shape=(1, 8, 8), preset="unet_small")  # attention at 16 on 8x8 input
    with pytest.raises(ConfigError, match="unknown UNet preset"):
        UNet(data_shape=(1, 8, 8), preset="nope")
    with pytest.raises(ConfigError, match="unknown UNet hyperparameter"):
        UNet(data_shape=(1, 8, 8), preset="unet_tiny", chanel_mult=(1,))
    # ADM's UNet shares the check (it once built 1 attention block where the config asked for them at 3x3)
    from genflow.nets.adm import ADMUNet

    small = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, channel_mult_emb=2, channels_per_head=8)
    with pytest.raises(ConfigError, match=r"attn_resolutions \[3\] include \[3\], which this UNet never reaches"):
        ADMUNet(data_shape=(1, 8, 8), attn_resolutions=(3,), **small)
    with pytest.raises(ConfigError, match=r"2\^1 = 2"):
        ADMUNet(data_shape=(1, 7, 7), attn_resolutions=(), **small)


def naive_attention(q, k, v, mask=None):
    w = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf"))
    return w.softmax(-1) @ v


def split_heads(t, h):
    b, l, c = t.shape
    return t.reshape(b, l, h, c // h).transpose(1, 2)


def merge_heads(t):
    b, h, l, d = t.shape
    return t.transpose(1, 2).reshape(b, l, h * d)


def test_attention_matches_naive_softmax_reference():
    torch.manual_seed(0)
    c, h = 12, 3
    att = perturb_(Attention(c, num_heads=h), 0.3).double()
    x = torch.randn(2, 5, c, dtype=torch.float64)
    wq, wk, wv = att.qkv.weight.split(c)
    bq, bk, bv = att.qkv.bias.split(c)
    q, k, v = (split_heads(x @ w.T + b, h) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    ref = merge_heads(naive_attention(q, k, v)) @ att.proj.weight.T + att.proj.bias
    torch.testing.assert_close(att(x), ref, rtol=1e-10, atol=1e-10)

    # extra key/value tokens (a reference view) join keys and values only
    e = torch.randn(2, 3, c, dtype=torch.float64)
    ke, ve = split_heads(e @ wk.T + bk, h), split_heads(e @ wv.T + bv, h)
    ref_e = merge_heads(naive_attention(q, torch.cat([k, ke], 2), torch.cat([v, ve], 2))) @ att.proj.weight.T + att.proj.bias
    torch.testing.assert_close(att(x, extra=e), ref_e, rtol=1e-10, atol=1e-10)

    # boolean key mask
    mask = torch.tensor([True, False, True, True, False])[None, None, None, :]
    ref_m = merge_heads(naive_attention(q, k, v, mask)) @ att.proj.weight.T + att.proj.bias
    torch.testing.assert_close(att(x, mask=mask), ref_m, rtol=1e-10, atol=1e-10)

    # cross-attention to a context (one token per sample: softmax over one key = 1, output = V(context))
    cross = perturb_(Attention(c, num_heads=h, context_channels=7), 0.3).double()
    ctx = torch.randn(2, 1, 7, dtype=torch.float64)
    v_ctx = (ctx @ cross.kv.weight[c:].T + cross.kv.bias[c:]).expand(2, 5, c)
    torch.testing.assert_close(cross(x, context=ctx), v_ctx @ cross.proj.weight.T + cross.proj.bias)
    with pytest.raises(ValueError):
        cross(x)


def test_multiview_attention_mixes_views_only_within_an_object():
    torch.manual_seed(0)
    block = perturb_(UNetBlock(8, 8, 16, attention=True, num_heads=2), 0.2).eval()
    x, emb = torch.randn(4, 8, 4, 4), torch.randn(4, 16)  # 2 objects x 2 views
    joint = block(x, emb, views=2)
    # changing object 1's second view changes object 1's first view (cross-view attention) ...
    x2 = x.clone()
    x2[1] = torch.randn(8, 4, 4)  # (a constant shift would vanish in the GroupNorms)
    joint2 = block(x2, emb, views=2)
    assert (joint2[0] - joint[0]).abs().max() > 1e-4
    # ... but never object 2's views, and per-view attention (views=1) does not mix at all
    torch.testing.assert_close(joint2[2:], joint[2:])
    torch.testing.assert_close(block(x2, emb)[0], block(x, emb)[0])


def test_fir_resampling():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    box = torch.full((2, 2), 0.25)
    # fast paths equal the generic depthwise (transposed) convolution
    torch.testing.assert_close(downsample2d(x, box, box=True), downsample2d(x, box, box=False))
    torch.testing.assert_close(upsample2d(x, box, box=True), upsample2d(x, box, box=False))
    torch.testing.assert_close(upsample2d(x, box, box=True), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    # [1,3,3,1]: a constant image stays constant away from the zero-padded border; the 1-D
    # filter [1,3,3,1]/8 on a ramp gives the ramp sampled at the pixel-pair midpoints
    f = Conv2d(1, 1, 0, down=True, resample_filter=(1, 3, 3, 1)).resample_filter
    assert f.shape == (4, 4) and torch.isclose(f.sum(), torch.tensor(1.0))
    ones = torch.ones(1, 1, 8, 8)
    torch.testing.assert_close(downsample2d(ones, f, False)[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2))
    torch.testing.assert_close(upsample2d(ones, f, False)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    torch.testing.assert_close(downsample2d(ramp, f, False)[0, 0, 1, 1:-1], torch.tensor([2.5, 4.5]))
    # fused conv-then-filter keeps the output size of filter-then-conv
    conv = Conv2d(3, 5, 3, down=True, resample_filter=(1, 3, 3, 1), fused_down=True)
    assert conv(x).shape == (2, 5, 4, 4)


def test_noise_embeddings_closed_form():
    pe = PositionalEmbedding(8, max_positions=10000, endpoint=True)
    t = torch.tensor([0.0, 0.7, -2.0])
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    torch.testing.assert_close(pe(t), torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
    torch.manual_seed(0)
    fe = FourierEmbedding(6, scale=16)
    a = 2 * math.pi * t[:, None] * fe.freqs
    torch.testing.assert_close(fe(t), torch.cat([a.cos(), a.sin()], 1))
    assert 4 < fe.freqs.abs().mean() < 40  # N(0, 16^2): E|f| = 16 * sqrt(2/pi) = 12.8
    assert "freqs" in fe.state_dict() and "freqs" not in pe.state_dict()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = UNet(data_shape=(3, 8, 8), num_classes=3, **dict(TINY, attn_resolutions=(4,), augment_dim=9,
               embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1)))
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    cond = {"class": F.one_hot(torch.arange(4) % 3, 3).float(), "augment": torch.randn(4, 9)}
    net(x, torch.randn(4), cond).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    # without an augmentation label the augment map still joins the graph (DDP needs that)
    net.zero_grad(set_to_none=True)
    net(x, torch.randn(4), {"class": cond["class"]}).sum().backward()
    assert net.map_augment.weight.grad is not None


def test_determinism_and_batch_independence():
    kw = dict(data_shape=(1, 8, 8), preset="unet_tiny")
    torch.manual_seed(3)
    a = UNet(**kw)
    torch.manual_seed(3)
    b = UNet(**kw)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    perturb_(a), perturb_(b)
    a.eval()
    x, t = torch.randn(6, 1, 8, 8), torch.randn(6)
    with torch.no_grad():
        out = a(x, t)
        assert torch.equal(out, a(x, t))
        torch.testing.assert_close(a(x[2:3], t[2:3]), out[2:3], rtol=1e-5, atol=1e-6)


def test_channels_last_matches_default_layout():
    torch.manual_seed(0)
    net = perturb_(UNet(data_shape=(3, 8, 8), **dict(TINY, attn_resolutions=(4,)))).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.randn(3)
    with torch.no_grad():
        ref = net(x, t)
        net.channels_last = True
        out = net(x, t)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_net_configs_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg_dir = Path(__file__).resolve().parents[1] / "configs" / "net"
    shapes = {"ddpmpp_cifar10": (3, 32, 32), "ncsnpp_cifar10": (3, 32, 32), "ddpmpp_ffhq64": (3, 64, 64),
              "unet_small": (3, 32, 32), "unet_tiny": (1, 8, 8), "unet_digits": (1, 8, 8), "mlp": (2,)}
    for name, shape in shapes.items():
        cfg = OmegaConf.load(cfg_dir / f"{name}.yaml")
        assert "data_shape" not in cfg and "num_classes" not in cfg
        with torch.device("meta"):
            net = instantiate(cfg, data_shape=shape, num_classes=0)
        assert isinstance(net, MLP if name == "mlp" else UNet)
