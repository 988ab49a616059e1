"""Isotropic3D (Liu et al. 2024) pieces around the net: cameras, renderer, lossy encoder, multi-view
data (toy + folder format), inference condition, stage configs and the stage-1 -> stage-2 ->
inference weight path, and a slow learning test that the reference is used."""
import json
import math

import pytest
import torch

from genflow.data.multiview import MultiView, inference_cond, load_reference_image, save_views
from genflow.data.render import camera_to_world, get_camera, render_boxes
from genflow.errors import ConfigError
from genflow.nets.encoders import ImageStatsEncoder, build_encoder


# ------------------------------------------------------------------------------ 12. cameras
def test_get_camera_single_conversion_fixed_vectors():
    cams = get_camera(4, elevation=15).double()
    e = math.radians(15)
    for k, a in enumerate((0, 90, 180, 270)):
        a = math.radians(a)
        want = torch.tensor([math.cos(e) * math.sin(a), -math.cos(e) * math.cos(a), math.sin(e)], dtype=torch.float64)
        torch.testing.assert_close(cams[k, :3, 3], want, atol=1e-6, rtol=0)
    rot = cams[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3, dtype=torch.float64).expand(4, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    # OpenGL camera: it looks down its -z axis, i.e. the back axis (column 2) points from the origin to it
    torch.testing.assert_close(rot[:, :, 2], cams[:, :3, 3], atol=1e-6, rtol=0)
    # the camera's up (column 1) has a positive world-z component: z-up (Blender) world
    assert (rot[:, 2, 1] > 0).all()
    torch.testing.assert_close(cams[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(4, 4))


def test_get_camera_isotropic3d_compat_reproduces_double_conversion():
    cams = get_camera(4, elevation=15, compat="isotropic3d").double()
    # the released loop: e <- deg2rad(e) every iteration, a <- deg2rad(a); the builder converts again
    e, want = 15.0, []
    for a in (0.0, 90.0, 180.0, 270.0):
        e = e * math.pi / 180
        ee, aa = math.radians(e), math.radians(a * math.pi / 180)
        want.append([math.cos(ee) * math.sin(aa), -math.cos(ee) * math.cos(aa), math.sin(ee)])
    torch.testing.assert_close(cams[:, :3, 3], torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    # MVDream's camera numbers: effective azimuths 0, 1.57, 3.14, 4.71 deg; elevation 0.26 deg then ~0
    azim = torch.rad2deg(torch.atan2(cams[:, 0, 3], -cams[:, 1, 3]))
    torch.testing.assert_close(azim, torch.tensor([0.0, 1.5708, 3.1416, 4.7124], dtype=torch.float64), atol=1e-3, rtol=0)
    elev = torch.rad2deg(torch.asin(cams[:, 2, 3]))
    torch.testing.assert_close(elev, torch.tensor([0.2618, 0.00457, 0.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="compat"):
        get_camera(4, compat="mvdream")


def test_renderer_hits_box_centre_and_sees_the_facing_colour():
    half = torch.tensor([[0.5, 0.5, 0.5]])
    colors = torch.zeros(1, 6, 3)
    colors[0, 2] = torch.tensor([1.0, 0.0, 0.0])         # -y face: the one azimuth 0 looks at
    colors[0, 3] = torch.tensor([0.0, 0.0, 1.0])         # +y face: seen from azimuth 180
    cams = torch.stack([camera_to_world(torch.tensor(0.0), torch.tensor(a)) for a in (0.0, 180.0)])[None]
    img = render_boxes(half, colors, cams, resolution=16, supersample=1)
    centre = (img[0, :, :, 8, 8] + 1) / 2
    assert centre[0, 0] > 0.4 and centre[0, 1:].abs().max() < 1e-6       # red (shaded) front
    assert centre[1, 2] > 0.4 and centre[1, :2].abs().max() < 1e-6       # blue back
    assert torch.equal(img[0, :, :, 0, 0], torch.ones(2, 3))             # white corner: background


# ------------------------------------------------------------------------------- encoder
def test_stats_encoder_closed_form_and_lossy():
    img = torch.ones(1, 3, 4, 4)                           # white
    img[0, :, 1:3, 2:4] = torch.tensor([-1.0, 0.0, 1.0])[:, None, None].expand(3, 2, 2)
    img[0, 0, 1, 2] = 0.5                                  # one pixel redder
    emb = ImageStatsEncoder()(img)[0]
    lin = torch.linspace(-1, 1, 4)
    want = torch.tensor([(-1 * 3 + 0.5) / 4, 0.0, 1.0, 4 / 16 * 2 - 1, (lin[3] - lin[2]) - 1, (lin[2] - lin[1]) - 1,
                         (lin[2] + lin[3]) / 2, (lin[1] + lin[2]) / 2])
    torch.testing.assert_close(emb, want, atol=1e-6, rtol=0)
    # lossy on purpose: moving colours around inside the silhouette does not change the embedding
    swapped = img.clone()
    swapped[0, :, 1, 2], swapped[0, :, 2, 3] = img[0, :, 2, 3], img[0, :, 1, 2]
    assert not torch.equal(swapped, img)
    torch.testing.assert_close(ImageStatsEncoder()(swapped), emb[None], atol=1e-6, rtol=0)


def test_openclip_encoder_needs_local_weights(tmp_path):
    missing = tmp_path / "open_clip_vit_h14.bin"
    with pytest.raises(ConfigError, match="open_clip_vit_h14.bin"):
        build_encoder("openclip", weights=str(missing))
    with pytest.raises(ConfigError, match="dim"):
        build_encoder("stats", dim=1024)
    with pytest.raises(ConfigError, match="unknown"):
        build_encoder("vae")


# ---------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def toy():
    dm = MultiView(num_objects=24, views=4, resolution=16, batch_size=4, val_fraction=0.25)
    dm.setup()
    return dm


def test_toy_datamodule_batches(toy):
    assert toy.data_shape == (4, 3, 16, 16) and toy.num_classes == 0
    x, cond = next(iter(toy.train_dataloader()))
    assert x.shape == (4, 4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert cond["camera"].shape == (4, 4, 4, 4) and cond["image_emb"].shape == (4, 8)
    assert cond["reference"].shape == (4, 3, 16, 16) and cond["reference_camera"].shape == (4, 4, 4)
    torch.testing.assert_close(cond["camera"][..., :3, 3].norm(dim=-1), torch.ones(4, 4))
    # targets: 4 azimuths 90 degrees apart at one elevation
    pos = cond["camera"][0, :, :3, 3]
    torch.testing.assert_close(pos[:, 2], pos[:1, 2].expand(4), atol=1e-6, rtol=0)
    az = torch.atan2(pos[:, 0], -pos[:, 1])
    step = torch.remainder(az.diff(), 2 * math.pi)
    torch.testing.assert_close(step, torch.full((3,), math.pi / 2), atol=1e-5, rtol=0)
    # the embedding is the encoder applied to the reference view
    torch.testing.assert_close(cond["image_emb"], ImageStatsEncoder()(cond["reference"]), atol=1e-6, rtol=0)
    assert len(toy.val_tensor()) == 6 and len(toy.train_tensor()) == 18
    again = MultiView(num_objects=24, views=4, resolution=16, val_fraction=0.25, seed=99)
    assert torch.equal(again.val_tensor(), toy.val_tensor())     # toy objects do not depend on the training seed


@pytest.mark.parametrize("pose", ["random", "front"])
def test_reference_is_a_separate_render(pose):
    """The reference is never one of the targets (the net could copy it); view0 mode is refused."""
    dm = MultiView(num_objects=4, views=4, resolution=16, reference_pose=pose, val_fraction=0.0)
    data = dm.all_objects()
    diff = (data["reference"][:, None] - data["x"]).abs().flatten(2).amax(2)      # (objects, views)
    assert bool((diff > 0.05).all())
    cam_diff = (data["reference_camera"][:, None] - data["camera"]).abs().flatten(2).amax(2)
    assert bool((cam_diff > 1e-3).all())
    with pytest.raises(ConfigError, match="copy of target"):
        MultiView(num_objects=4, views=4, resolution=16, reference_pose="view0")


def test_folder_format_round_trip(tmp_path, toy):
    import torchvision

    data = toy.all_objects()
    for i in range(3):
        obj = tmp_path / f"obj{i}"
        obj.mkdir()
        views = []
        for v in range(4):
            torchvision.utils.save_image((data["x"][i, v] + 1) / 2, obj / f"{v:03d}.png")
            c2w = data["camera"][i, v].clone()
            c2w[:3, 3] *= 2.5                                   # real renders sit at some distance
            views.append({"file": f"{v:03d}.png", "c2w": c2w.tolist()})
        torchvision.utils.save_image((data["reference"][i] + 1) / 2, obj / "ref.png")
        meta = {"views": views, "reference": {"file": "ref.png", "c2w": data["reference_camera"][i].tolist()}}
        (obj / "cameras.json").write_text(json.dumps(meta))
    dm = MultiView(root=str(tmp_path), views=4, resolution=16, val_fraction=0.0)
    got = dm.all_objects()
    torch.testing.assert_close(got["x"], data["x"][:3], atol=1.01 / 127.5, rtol=0)   # 8-bit PNG quantisation
    torch.testing.assert_close(got["camera"], data["camera"][:3], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["reference"], data["reference"][:3], atol=1.01 / 127.5, rtol=0)
    with pytest.raises(ConfigError, match="views"):
        MultiView(root=str(tmp_path), views=5, resolution=16).all_objects()
    meta = json.loads((tmp_path / "obj0" / "cameras.json").read_text())
    del meta["reference"]
    (tmp_path / "obj0" / "cameras.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="no \"reference\" entry"):
        MultiView(root=str(tmp_path), views=4, resolution=16).all_objects()


def test_inference_cond_and_side_by_side_writer(tmp_path, toy):
    import torchvision

    ref = toy.all_objects()["reference"][0]
    png = tmp_path / "ref.png"
    torchvision.utils.save_image((ref + 1) / 2, png)
    cfg = {"views": 4, "resolution": 16, "encoder": {"name": "stats", "dim": 8},
           "inference": {"elevation": 15.0, "azimuth_start": 0.0}}
    cond = inference_cond(str(png), cfg, "cpu", num=2)
    assert set(cond) == {"camera", "image_emb"}                 # the paper samples without the reference
    assert cond["camera"].shape == (2, 4, 4, 4) and cond["image_emb"].shape == (2, 8)
    torch.testing.assert_close(cond["camera"][0], get_camera(4, 15.0))
    torch.testing.assert_close(cond["image_emb"][0], ImageStatsEncoder()(load_reference_image(png, 16))[0])
    emb_file = tmp_path / "emb.pt"
    torch.save(cond["image_emb"][0], emb_file)
    torch.testing.assert_close(inference_cond(str(emb_file), cfg, "cpu")["image_emb"][0], cond["image_emb"][0])
    import numpy as np

    np.save(tmp_path / "emb.npy", cond["image_emb"][0].numpy())
    torch.testing.assert_close(inference_cond(str(tmp_path / "emb.npy"), cfg, "cpu")["image_emb"][0], cond["image_emb"][0])
    with pytest.raises(ConfigError, match="dim"):
        torch.save(torch.zeros(5), tmp_path / "bad.pt")
        inference_cond(str(tmp_path / "bad.pt"), cfg, "cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        inference_cond(str(tmp_path / "nope.png"), cfg, "cpu")
    full = inference_cond(str(png), cfg, "cpu", with_reference=True)
    assert full["reference"].shape == (1, 3, 16, 16) and full["reference_camera"].shape == (1, 4, 4)
    out = save_views(tmp_path / "views.png", torch.rand(2, 4, 3, 16, 16) * 2 - 1, reference=ref)
    img = torchvision.io.read_image(str(out))
    assert img.shape == (3, 2 * 18 + 2, 5 * 18 + 2)              # 2 rows of [reference | 4 views], padding 2


# ------------------------------------------------------------------- configs and stage path
def _compose(stage):
    from genflow.config import compose

    return compose([f"experiment=isotropic3d_stage{stage}", "data.num_objects=8", "data.batch_size=4", "data.resolution=8",
                    "net.model_channels=16", "net.attn_resolutions=[8,4]", "net.channels_per_head=8"])


def test_stage_configs_and_weights_path(tmp_path):
    from genflow.config import build

    cfg1, cfg2 = _compose(1), _compose(2)
    assert cfg1.model._target_.endswith("EDM") and cfg1.data._target_.endswith("MultiView")
    assert cfg1.net.stage == 1 and cfg2.net.stage == 2 and cfg2.net.embedding_dim == 8
    m1, dm = build(cfg1, prepare=False)
    m2, _ = build(cfg2, prepare=False)
    assert not m1.net.use_reference and m2.net.use_reference
    # stage 2 continues from stage-1 weights: identical keys (the reference adds no parameters)
    res = m2.load_state_dict(m1.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    # ...and inference (no reference, V views) loads the stage-2 weights with no missing/extra keys
    m_inf, _ = build(cfg1, prepare=False)
    res = m_inf.load_state_dict(m2.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    x, cond = next(iter(dm.train_dataloader()))
    m2.eval()
    loss = m2.method.loss(m2.net, x, cond)
    assert loss.shape == (x.shape[0],) and torch.isfinite(loss).all()
    sample_cond = dm.sample_cond([0, 1, 2], "cpu")
    assert set(sample_cond) == {"camera", "image_emb"}


# ------------------------------------------------------------------- 13. the reference is used
def _heldout_error(net, edm, x, cond, sigma, with_ref, n_noise=4):
    g = torch.Generator().manual_seed(123)
    c = cond if with_ref else {k: v for k, v in cond.items() if not k.startswith("reference")}
    errs = []
    with torch.no_grad():
        for _ in range(n_noise):
            noisy = x + sigma * torch.randn(x.shape, generator=g)
            errs.append(((edm.denoise(net, noisy, sigma, c) - x) ** 2).flatten(2).mean(2))   # (B, V)
    return torch.stack(errs).mean(0)


@pytest.mark.slow
def test_reference_lowers_heldout_error_at_high_noise():
    """One stage-2 model trained with the reference dropped half the time, evaluated on held-out objects
    with and without it at sigma = 3 (x0 mostly unknown from x): the reference must lower the error.
    Calibration on the 2-core CPU (same seeds): after 600 steps 0.0973 with vs 0.0991 without, z = 3.2;
    the effect is small at this budget (a longer run saw 19% after 2500 steps at t = 900)."""
    from genflow.methods.edm import EDM
    from genflow.nets.multiview import MultiViewUNet

    torch.manual_seed(0)
    dm = MultiView(num_objects=400, views=4, resolution=8, reference_pose="random", val_fraction=0.15)
    dm.setup()
    net = MultiViewUNet(data_shape=dm.data_shape, embedding_dim=8, model_channels=16, channel_mult=(1, 2),
                        attn_resolutions=(8, 4), channels_per_head=16, p_drop_emb=0.0, p_drop_ref=0.5)
    edm = EDM(P_mean=0.0, P_std=1.2)                         # emphasise the noise levels the test looks at
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x_tr, c_tr = dm.train_tensor(), dm.train_cond()
    g = torch.Generator().manual_seed(0)
    net.train()
    for step in range(600):
        idx = torch.randint(0, x_tr.shape[0], (16,), generator=g)
        loss = edm.loss(net, x_tr[idx], {k: v[idx] for k, v in c_tr.items()}).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    x_va, c_va = dm.val_tensor(), dm.val_cond()
    e_ref = _heldout_error(net, edm, x_va, c_va, 3.0, True)
    e_none = _heldout_error(net, edm, x_va, c_va, 3.0, False)
    diff = (e_none - e_ref).mean(1)                          # per held-out object, paired
    se = diff.std() / math.sqrt(diff.numel())
    assert diff.mean() > 2 * se, (e_ref.mean().item(), e_none.mean().item(), se.item())


def test_multiview_data_moves_to_a_device_whole():
    """data.on_device moves the training split once: every tensor of a multi-view set goes (it once had no
    ``to`` at all), and the batches are the same."""
    from genflow.data.multiview import MultiView

    dm = MultiView(num_objects=8, views=2, resolution=8, val_fraction=0.0)
    data = dm.fit_dataset()
    moved = data.to("meta")
    assert moved.x.is_meta and all(v.is_meta for v in moved.cond.values()) and not data.x.is_meta
    x, cond = data.__getitems__([3, 0])
    x2, cond2 = data.to("cpu").__getitems__([3, 0])
    assert torch.equal(x, x2) and all(torch.equal(cond[k], cond2[k]) for k in cond)
