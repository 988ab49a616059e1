"""Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", 2024) for every method.

* Each method's ODE velocity of the autoguided net is the paper's mix of the two models' velocities,
  v_guide + w (v_good - v_guide): mixing net outputs is mixing denoisers / velocities / noise predictions.
* ``guidance=1`` is the good model exactly (sample.py and evaluate, bit for bit); w = 2 is what the library's
  ``Autoguided`` net gives.
* A guide of another method or data is refused before any sampling (error / why / fix, exit 2).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genflow.methods.base import Autoguided, autoguided

METHODS = [["model=edm"], ["model=pfgmpp", "D=128"], ["model=ddpm"], ["model=spd"], ["model=flow"],
           ["model=flow", "path=ko"], ["model=flow", "path=vp"]]


class _Net(torch.nn.Module):
    """A small nonlinear net with the genflow signature net(x, noise_label, cond)."""

    def __init__(self, seed: int, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(dim, dim, generator=g) / dim ** 0.5)

    def forward(self, x, noise_label, cond=None):
        flat = x.flatten(1)
        return torch.tanh(flat @ self.a + noise_label.view(-1, 1)).view_as(x)


@pytest.mark.parametrize("overrides", METHODS, ids=lambda o: " ".join(o))
def test_velocity_of_the_autoguided_net_is_the_mix_of_velocities(overrides):
    from genflow.config import build_data, build_method, compose

    cfg = compose([*overrides, "data=digits"], validator=False)
    method = build_method(cfg)
    method.prepare(build_data(cfg))
    good, bad = _Net(0, 64), _Net(1, 64)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    grid = method.time_grid(4)
    t = grid[1].to(torch.float32)
    with torch.no_grad():
        v_good, v_bad = method.velocity(good, x, t), method.velocity(bad, x, t)
        for w in (0.5, 2.0, 3.0):
            mixed = method.velocity(Autoguided(good, bad, w), x, t)
            torch.testing.assert_close(mixed, v_bad + w * (v_good - v_bad), rtol=1e-5, atol=1e-5 * v_good.abs().max())
        assert autoguided(good, bad, 1.0) is good and autoguided(good, None, 2.0) is good


@pytest.fixture(scope="module")
def guide_of(trained_run):
    """An earlier checkpoint of the shared tiny run: a weaker model of the same method and data."""
    from pathlib import Path

    found = sorted((Path(trained_run["run_dir"]) / "checkpoints").glob("step_*.ckpt"))
    assert found, "the shared run keeps periodic checkpoints"
    return str(found[0])


def _samples(cli, tmp_path, name, *args):
    out = tmp_path / name
    code, stdout, err = cli("sample.py", *args, "num=3", "steps=2", f"out={out}", "progress=false")
    assert code == 0, err
    return np.load(out / "samples.npz")["images"]


def test_guidance_one_is_the_good_model_exactly(trained_ckpt, guide_of, tmp_path, cli):
    plain = _samples(cli, tmp_path, "plain", f"ckpt={trained_ckpt}")
    same = _samples(cli, tmp_path, "w1", f"ckpt={trained_ckpt}", f"guide_ckpt={guide_of}", "guidance=1")
    assert np.array_equal(plain, same)
    # the guide decides the images: samples of another guide are not mixed into this folder (samples.json)
    code, _, err = cli("sample.py", f"ckpt={trained_ckpt}", f"guide_ckpt={trained_ckpt}", "guidance=1", "num=3",
                       "steps=2", f"out={tmp_path / 'w1'}", "progress=false")
    assert code == 2 and "other settings (guide_ckpt)" in err, err
    guided = _samples(cli, tmp_path, "w2", f"ckpt={trained_ckpt}", f"guide_ckpt={guide_of}", "guidance=2")
    assert not np.array_equal(plain, guided)


def test_sample_py_mixes_as_the_library_does(trained_ckpt, guide_of, tmp_path, cli):
    from genflow.config import module_from_checkpoint
    from genflow.sampling import generate, sample_conditions, to_uint8

    guided = _samples(cli, tmp_path, "w2", f"ckpt={trained_ckpt}", f"guide_ckpt={guide_of}", "guidance=2")
    good, dm, _ = module_from_checkpoint(trained_ckpt)
    bad, _, _ = module_from_checkpoint(guide_of)
    seeds = [0, 1, 2]
    x = generate(good.method, Autoguided(good.net, bad.net, 2.0), seeds, dm.data_shape, steps=2,
                 cond=sample_conditions(dm, seeds, "cpu"), num_classes=dm.num_classes)
    assert np.array_equal(to_uint8(x).numpy(), guided)


def test_evaluate_with_guidance_one_scores_the_good_model(trained_ckpt, guide_of, cli):
    args = [f"ckpt={trained_ckpt}", "fid.num=16", "fid.steps=2", "progress=false"]
    code, out, err = cli("genflow.apps.evaluate", *args)
    assert code == 0, err
    code, out_w1, err = cli("genflow.apps.evaluate", *args, f"guide_ckpt={guide_of}", "fid.guidance=1")
    assert code == 0, err
    plain, w1 = json.loads(out.strip().splitlines()[-1]), json.loads(out_w1.strip().splitlines()[-1])
    assert plain["fid"] == w1["fid"] and w1["guide_ckpt"] == guide_of


def _altered(ckpt: str, path, **changes):
    data = torch.load(ckpt, weights_only=True)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data["hyper_parameters"]["config"][section][key] = value
    torch.save(data, path)
    return str(path)


def test_a_guide_of_another_method_or_data_is_refused_before_work(trained_ckpt, tmp_path, cli):
    other_d = _altered(trained_ckpt, tmp_path / "d.ckpt", model__D=2048)
    other_data = _altered(trained_ckpt, tmp_path / "res.ckpt", data__resolution=16)
    for guide, named in ((other_d, "model.D: 128"), (other_data, "data.resolution: 8 vs 16")):
        code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", f"guide_ckpt={guide}", "guidance=2", "num=2",
                             f"out={tmp_path / 'never'}")
        assert code == 2 and "not a model of the same method and data" in err and named in err, err
        assert not (tmp_path / "never").exists()
    code, out, err = cli("sample.py", f"ckpt={trained_ckpt}", f"guide_ckpt={trained_ckpt}", "num=2",
                         f"out={tmp_path / 'never'}")
    assert code == 2 and "without guidance=" in err
    code, out, err = cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", f"guide_ckpt={other_d}", "fid.guidance=2",
                         "fid.num=8")
    assert code == 2 and "not a model of the same method" in err


def test_train_needs_a_weight_for_its_guide(trained_ckpt, cli):
    code, out, err = cli("train.py", "model=pfgmpp", f"sample.guide_ckpt={trained_ckpt}", "trainer.max_steps=1")
    assert code == 2 and "without sample.guidance" in err


def test_leaderboard_entries_check_their_widths_and_guides():
    from genflow.errors import ConfigError
    from genflow.apps.leaderboard import check_suite

    with pytest.raises(ConfigError, match="0 < σ_rel"):
        check_suite({"entries": [{"ckpt": "a.ckpt", "posthoc": [0.05, 0.5]}]}, "s", "s.yaml")
    with pytest.raises(ConfigError, match="guide_ckpt but no fid.guidance"):
        check_suite({"entries": [{"ckpt": "a.ckpt", "guide_ckpt": "b.ckpt"}]}, "s", "s.yaml")
    suite = check_suite({"fid": {"guidance": 2}, "entries": [{"name": "a", "ckpt": "a.ckpt", "guide_ckpt": "b.ckpt",
                                                               "posthoc": 0.08}]}, "s", "s.yaml")
    assert [(e["name"], e["posthoc"], e["posthoc_of"]) for e in suite["entries"]] == [("a-sigma0.080", 0.08, "a")]
