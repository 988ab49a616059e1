"""MultiViewUNet properties (Isotropic3D, Liu et al. 2024; MVDream, Shi et al. 2023).

Every fixture re-randomises the near-zero layers (residual output convs, attention output
projections, the final conv, zero biases), so no property holds vacuously because a branch is 0.
Networks run in float64 so equalities can be checked to ~1e-12.
"""
import math

import pytest
import torch

from genflow.data.render import get_camera
from genflow.methods.base import guided
from genflow.methods.edm import EDM
from genflow.nets.multiview import MultiViewUNet, flatten_cameras

B, V, C, R, E = 3, 4, 3, 8, 8


def rerandomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() < 1e-3:  # zero-initialised or 1e-5-gain layers
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 / math.sqrt(fan_in) if p.ndim > 1 else 0.1))
    return net


def make_net(seed=0, **kw) -> MultiViewUNet:
    torch.manual_seed(seed)
    args = dict(data_shape=(V, C, R, R), embedding_dim=E, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                attn_resolutions=(8, 4), channels_per_head=8, p_drop_emb=0.0, p_drop_ref=0.0)
    args.update(kw)
    return rerandomise(MultiViewUNet(**args), seed).double().eval()


def make_batch(seed=0, b=B, v=V, reference=True):
    g = torch.Generator().manual_seed(seed)
    azim = torch.rand(b, 1, generator=g) * 360
    cams = torch.stack([get_camera(v, elevation=float(10 + 5 * i), azimuth_start=float(azim[i])) for i in range(b)])
    cond = {"camera": cams.double(), "image_emb": torch.randn(b, E, generator=g, dtype=torch.float64)}
    if reference:
        cond["reference"] = torch.randn(b, C, R, R, generator=g, dtype=torch.float64)
        cond["reference_camera"] = torch.stack([get_camera(1, 20.0, float(i * 40))[0] for i in range(b)]).double()
        # what a Method adds (Method.net_cond) when the net is called directly
        cond["reference_noise_label"] = torch.full((b,), math.log(0.002) / 4, dtype=torch.float64)
    x = torch.randn(b, v, C, R, R, generator=g, dtype=torch.float64)
    label = torch.randn(b, generator=g, dtype=torch.float64)
    return x, label, cond


def capture(module, kind="input"):
    store = {}
    if kind == "input":
        handle = module.register_forward_pre_hook(lambda m, args: store.__setitem__("value", args[0]))
    else:
        # clone: UNetBlock adds the residual to attention outputs in place
        handle = module.register_forward_hook(lambda m, args, out: store.__setitem__("value", out.clone()))
    return store, handle


# ---------------------------------------------------------------------------- 1. equivariance
@pytest.mark.parametrize("reference", [False, True])
def test_view_permutation_equivariance(reference):
    net = make_net()
    x, label, cond = make_batch(reference=reference)
    out = net(x, label, cond)
    perm = torch.tensor([2, 0, 3, 1])
    cond_p = dict(cond, camera=cond["camera"][:, perm])
    out_p = net(x[:, perm], label, cond_p)
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-10, rtol=0)
    assert (out - out[:, perm]).abs().max() > 1e-3  # the views differ, so the check has teeth


# ---------------------------------------------------------------------- 2. object independence
@pytest.mark.parametrize("attention", ["3d", "2d"])
def test_object_independence(attention):
    net = make_net(attention=attention)
    x, label, cond = make_batch()
    out = net(x, label, cond)
    x2, cond2, label2 = x.clone(), {k: v.clone() for k, v in cond.items()}, label.clone()
    x2[1] += 1.0
    cond2["reference"][1] *= -1
    cond2["image_emb"][1] += 1
    label2[1] += 0.5
    out2 = net(x2, label2, cond2)
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]], atol=1e-12, rtol=0)
    assert (out2[1] - out[1]).abs().max() > 1e-3


# ------------------------------------------------------------------ 3. cross-view mixing 3D/2D
def test_cross_view_mixing_only_in_3d():
    x, label, cond = make_batch(reference=False)
    x2 = x.clone()
    x2[:, 0] += torch.randn_like(x2[:, 0])
    net3 = make_net(attention="3d")
    d3 = (net3(x2, label, cond) - net3(x, label, cond))[:, 1:].abs().max()
    assert d3 > 1e-4
    net2 = make_net(attention="2d")
    d2 = (net2(x2, label, cond) - net2(x, label, cond))[:, 1:].abs().max()
    assert d2 == 0


def test_2d_mode_equals_per_view_calls():
    net = make_net(attention="2d")
    x, label, cond = make_batch(reference=False)
    out = net(x, label, cond)
    for v in range(V):
        one = net(x[:, v:v + 1], label, dict(cond, camera=cond["camera"][:, v:v + 1]))
        torch.testing.assert_close(one[:, 0], out[:, v], atol=1e-12, rtol=0)
    # 3D attention over a single view is the 2D computation
    net3 = make_net(attention="3d")
    one3 = net3(x[:, :1], label, dict(cond, camera=cond["camera"][:, :1]))
    torch.testing.assert_close(one3[:, 0], net(x[:, :1], label, dict(cond, camera=cond["camera"][:, :1]))[:, 0],
                               atol=1e-12, rtol=0)


# -------------------------------------------------------------------- 4. camera sensitivity
def test_camera_sensitivity():
    net = make_net()
    x, label, cond = make_batch(reference=False)
    out = net(x, label, cond)
    other = dict(cond, camera=torch.stack([get_camera(V, 25.0, 17.0)] * B).double())
    assert (net(x, label, other) - out).abs().max() > 1e-3
    with torch.no_grad():
        net.camera_mlp[-1].weight.zero_()
        net.camera_mlp[-1].bias.zero_()
    torch.testing.assert_close(net(x, label, other), net(x, label, cond), atol=0, rtol=0)


def test_camera_translation_is_normalised():
    c = get_camera(2, 10.0).double()
    far = c.clone()
    far[:, :3, 3] *= 3.7
    torch.testing.assert_close(flatten_cameras(far), flatten_cameras(c), atol=1e-12, rtol=0)
    assert flatten_cameras(c).shape == (2, 16)


# ------------------------------------------------------------- 5. single-token cross-attention
def test_single_token_cross_attention_is_position_independent():
    net = make_net()
    blk = next(b for b in net.enc if b.cross_attn is not None)
    store, handle = capture(blk.cross_attn, "output")
    x, label, cond = make_batch(reference=False)
    net(x, label, cond)
    out = store["value"]                                           # (B*V, H*W, C)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), atol=1e-12, rtol=0)
    assert (out[0, 0] - out[V, 0]).abs().max() > 1e-6              # but it depends on the embedding
    # zero embedding: softmax over one key is 1, so the output is proj(v-bias) + proj.bias
    net(x, label, dict(cond, image_emb=torch.zeros_like(cond["image_emb"])))
    handle.remove()
    attn = blk.cross_attn
    expected = attn.proj(attn.kv.bias[attn.channels:])
    torch.testing.assert_close(store["value"], expected.expand_as(store["value"]), atol=1e-12, rtol=0)


# -------------------------------------------------------------- 6. the reference is noise-free
def _clean_end(name):
    """(method, input scale, noise label) of clean data at each method's data end, written out by hand."""
    from genflow.methods import DDPM, FlowMatching

    if name == "edm":
        return EDM(), 1 / math.sqrt(0.002 ** 2 + 0.5 ** 2), math.log(0.002) / 4
    if name == "flow":
        return FlowMatching("condot"), 1.0, 1.0
    return DDPM(T=1000), 1.0, 1000 * (1 / 1000)


@pytest.mark.parametrize("slot,timestep,camera,method", [("last", "zero", "pose", "edm"),
                                                         ("first", "shared", "zero", "edm"),
                                                         ("last", "zero", "pose", "flow"),
                                                         ("last", "zero", "zero", "ddpm")])
def test_reference_frame_is_the_methods_clean_end(slot, timestep, camera, method):
    """The reference is fed as the running method feeds clean data (it once got EDM's c_in and label under
    every method: flow matching's reference saw label -1.55 and twice the amplitude)."""
    net = make_net(reference_slot=slot, reference_timestep=timestep, reference_camera=camera)
    method, scale, clean_label = _clean_end(method)
    x, label, cond = make_batch()
    frames, h1 = capture(net.conv_in)
    labels, h2 = capture(net.noise_embed)
    cams, h3 = capture(net.camera_mlp)
    seen = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        method.loss(net, x, cond)
        f = frames["value"].reshape(B, V + 1, C, R, R)
        ref_i = 0 if slot == "first" else V
        seen.append(f[:, ref_i].clone())
        torch.testing.assert_close(f[:, ref_i], scale * cond["reference"], atol=1e-6, rtol=1e-6)  # whatever the noise
        lab = labels["value"].reshape(B, V + 1)
        tgt = lab[:, 1:] if slot == "first" else lab[:, :V]
        assert torch.equal(tgt, tgt[:, :1].expand_as(tgt))               # one noise level per object
        want = tgt[:, 0] if timestep == "shared" else torch.full((B,), clean_label, dtype=lab.dtype)
        torch.testing.assert_close(lab[:, ref_i], want, atol=1e-6, rtol=1e-6)
        cam = cams["value"].reshape(B, V + 1, 16)
        want_cam = flatten_cameras(cond["reference_camera"]) if camera == "pose" else torch.zeros(B, 16, dtype=cam.dtype)
        torch.testing.assert_close(cam[:, ref_i], want_cam, atol=0, rtol=0)
    assert torch.equal(seen[0], seen[1])
    for h in (h1, h2, h3):
        h.remove()


# ------------------------------------------------------- 7. no loss on the reference, yet used
def test_reference_gets_zero_loss_gradient_but_changes_targets():
    net = make_net()
    x, label, cond = make_batch()
    store = {}

    def keep_grad(m, args, out):
        out.retain_grad()
        store["value"] = out

    handle = net.conv_out.register_forward_hook(keep_grad)
    torch.manual_seed(0)
    EDM().loss(net, x, cond).sum().backward()
    handle.remove()
    grad = store["value"].grad.reshape(B, V + 1, C, R, R)
    assert torch.count_nonzero(grad[:, V]) == 0                     # d loss / d pred_ref == 0 exactly
    assert grad[:, :V].abs().min(dim=-1).values.max() > 0
    # ...and the reference still moves the target predictions (3D attention), but not in 2D mode
    cond2 = dict(cond, reference=cond["reference"] + 1.0)
    with torch.no_grad():
        assert (net(x, label, cond2) - net(x, label, cond)).abs().max() > 1e-4
        net2 = make_net(attention="2d")
        assert torch.equal(net2(x, label, cond2), net2(x, label, cond))


def test_stage1_ignores_reference():
    net1 = make_net(stage=1)
    x, label, cond = make_batch()
    no_ref = {k: v for k, v in cond.items() if not k.startswith("reference")}
    assert torch.equal(net1(x, label, cond), net1(x, label, no_ref))


# ------------------------------------------------------- 8. reference dropped / inference path
def test_dropped_reference_equals_no_reference():
    net = make_net(p_drop_ref=1.0)
    x, label, cond = make_batch()
    no_ref = {k: v for k, v in cond.items() if not k.startswith("reference")}
    want = net(x, label, no_ref)
    net.train()
    got = net(x, label, cond)                                       # keys of the reference masked out
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    net.p_drop_ref = 0.0
    assert (net(x, label, cond) - want).abs().max() > 1e-4


def test_stage2_weights_load_into_inference_net_without_missing_keys():
    stage2 = make_net(stage=2)
    infer = MultiViewUNet(data_shape=(V, C, R, R), embedding_dim=E, model_channels=16, channel_mult=(1, 2),
                          num_blocks=1, attn_resolutions=(8, 4), channels_per_head=8, stage=1).double().eval()
    result = infer.load_state_dict(stage2.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x, label, cond = make_batch()
    no_ref = {k: v for k, v in cond.items() if not k.startswith("reference")}
    torch.testing.assert_close(infer(x, label, no_ref), stage2(x, label, no_ref), atol=0, rtol=0)


# ----------------------------------------------------------------------------------- 9. CFG
@pytest.mark.parametrize("p_emb,p_ref", [(0.1, 0.3), (0.5, 0.05)])
def test_condition_dropout_rates(p_emb, p_ref):
    net = make_net(p_drop_emb=p_emb, p_drop_ref=p_ref)
    n = 40000
    keep_emb, keep_ref = net.dropout_masks(n, generator=torch.Generator().manual_seed(3))
    for keep, p in ((keep_emb, p_emb), (keep_ref, p_ref)):
        rate = 1 - keep.double().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    # the two drops are independent: joint rate is the product
    both = (~keep_emb & ~keep_ref).double().mean().item()
    assert abs(both - p_emb * p_ref) < 4 * math.sqrt(p_emb * p_ref / n)


def test_embedding_dropout_is_the_null_condition():
    net = make_net(p_drop_emb=1.0)
    x, label, cond = make_batch(reference=False)
    from genflow.methods.base import null_cond

    null = dict(cond, **null_cond(cond))  # the uncond branch of guided(): embedding zeroed, cameras kept
    assert torch.equal(null["camera"], cond["camera"]) and not null["image_emb"].any()
    want = net(x, label, null)
    net.train()
    torch.testing.assert_close(net(x, label, cond), want, atol=0, rtol=0)


def test_guidance_combines_with_zero_embedding_branch():
    net = make_net()
    x, label, cond = make_batch()
    w = 3.0
    out = guided(net, w)(x, label, cond)
    # independent of null_cond: only the image embedding is zeroed; cameras and reference are inputs
    uncond = {k: (torch.zeros_like(v) if k == "image_emb" else v) for k, v in cond.items()}
    c, u = net(x, label, cond), net(x, label, uncond)
    torch.testing.assert_close(out, u + w * (c - u), atol=1e-10, rtol=0)


# -------------------------------------------------------------------------- 10. shared timestep
def test_edm_gives_one_noise_level_per_object():
    seen = {}

    def recorder(x_in, noise_label, cond=None):
        seen["x"], seen["label"] = x_in, noise_label
        return torch.zeros_like(x_in)

    x = torch.zeros(64, V, C, R, R)
    torch.manual_seed(0)
    EDM().loss(recorder, x, None)
    assert seen["label"].shape == (64,)
    # with zero data the input is c_in * sigma * n: its per-view std is the same for all views of an object
    std = seen["x"].flatten(2).std(dim=2)                          # (64, V)
    ratio = std / std.mean(dim=1, keepdim=True)
    assert ratio.sub(1).abs().max() < 0.35                          # 192 values per view: sd of std ~5%
    assert std.mean(dim=1).max() / std.mean(dim=1).min() > 1.5      # while objects differ


def test_bad_inputs_raise():
    net = make_net()
    x, label, cond = make_batch()
    with pytest.raises(ValueError, match="camera"):
        net(x, label, {"image_emb": cond["image_emb"]})
    with pytest.raises(ValueError, match=r"\(B, V, C, H, W\)"):
        net(x[:, 0], label, cond)
    from genflow.errors import ConfigError

    with pytest.raises(ConfigError, match="data_shape"):
        MultiViewUNet(data_shape=(3, 8, 8))
    with pytest.raises(ConfigError, match="attention"):
        MultiViewUNet(data_shape=(V, C, R, R), attention="4d")


def test_bench_multiview_runs_with_the_threads_the_bench_chose():
    """`python -m genflow.apps.bench multiview` without threads= (it once passed None to torch.set_num_threads)."""
    from genflow.apps import bench

    result = bench.main(["what=multiview", "views=[2]", "steps=1", "warmup=1", "objects=1", "resolution=8",
                         "modes=[3d]"])
    assert [p["attention"] for p in result["points"]] == ["3d"] and result["points"][0]["step_ms_median"] > 0
