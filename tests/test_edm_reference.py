"""sample.py on a converted NVlabs EDM network against EDM's own generate.py sampler, seed for seed.

Runs when EDM_DIR points at an extract of https://github.com/NVlabs/edm (skipped otherwise): a random-weight
EDMPrecond(SongUNet) built by EDM's training/networks.py, pickled by EDM's persistence as a snapshot, is
converted with genflow.apps.convert; generate.py's ``edm_sampler`` and ``StackedRandomGenerator`` draw the images
of seeds 0-7 as its main loop does (latents, then labels, then the sampler's noise from each seed's
generator), and sample.py must write the same uint8 images (within one level where a value sits at a
rounding boundary).
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

EDM_DIR = os.environ.get("EDM_DIR")
pytestmark = pytest.mark.skipif(not EDM_DIR, reason="EDM_DIR (an extract of NVlabs/edm) is not set")


@pytest.fixture(scope="module")
def edm():
    """EDM's generate and networks modules, imported from EDM_DIR (their modules removed afterwards)."""
    before = set(sys.modules)
    sys.path.insert(0, str(Path(EDM_DIR).expanduser()))
    try:
        with warnings.catch_warnings():  # distutils (dnnlib) and other deprecations of EDM's 2022 code
            warnings.simplefilter("ignore")
            # EDM's own modules, found on EDM_DIR (not a dependency of genflow)
            generate, networks = (importlib.import_module(m) for m in ("generate", "training.networks"))
        yield generate, networks
    finally:
        sys.path.remove(str(Path(EDM_DIR).expanduser()))
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("generate", "training", "torch_utils", "dnnlib"):
                del sys.modules[name]


def converted(networks, tmp_path, label_dim):
    """(EDM's network, the genflow checkpoint converted from its snapshot pickled by EDM's persistence)."""
    from genflow.apps.convert import convert

    net = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=label_dim, model_type="SongUNet",
                              model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                              dropout=0.0).eval()
    g = torch.Generator().manual_seed(label_dim + 1)
    with torch.no_grad():  # EDM zero-initialises output layers; random weights give real images
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
    pkl, ckpt = tmp_path / f"network-snapshot-{label_dim}.pkl", tmp_path / f"net-{label_dim}.ckpt"
    with open(pkl, "wb") as f:
        pickle.dump(dict(ema=net), f)
    return net, convert(pkl, ckpt)


def edm_images(generate, net, seeds, class_idx=None, **sampler):
    """generate.py's main loop for one batch of seeds (CPU), returning uint8 NCHW images."""
    rnd = generate.StackedRandomGenerator(torch.device("cpu"), seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[len(seeds)])]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    with torch.no_grad():
        images = generate.edm_sampler(net, latents, labels, randn_like=rnd.randn_like, **sampler)
    return images, (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


CHURN = {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
CASES = {  # name: (label_dim, class, sampler settings of sample.py, its time grid settings)
    "heun": (0, None, {"steps": 18}, {}),
    "heun-grid": (0, None, {"steps": 7}, {"rho": 5.0, "sigma_min": 0.01, "sigma_max": 40.0}),
    "stochastic": (0, None, {"steps": 12, "solver": "stochastic", **CHURN}, {}),
    "cond-heun": (10, None, {"steps": 10}, {}),
    "cond-stochastic": (10, None, {"steps": 12, "solver": "stochastic", **CHURN}, {}),
    "cond-stochastic-class": (10, 7, {"steps": 12, "solver": "stochastic", **CHURN}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_py_reproduces_edm_generate(case, edm, tmp_path):
    from genflow.apps.sample import main as sample

    generate, networks = edm
    label_dim, class_idx, options, grid = CASES[case]
    net, ckpt = converted(networks, tmp_path, label_dim)
    seeds = list(range(8))
    names = {"S_tmin": "S_min", "S_tmax": "S_max", "steps": "num_steps"}
    sampler = {names.get(k, k): v for k, v in {**options, **grid}.items() if k != "solver"}
    want_float, want = edm_images(generate, net, seeds, class_idx, **sampler)
    args = [f"ckpt={ckpt}", "seeds=0-7", f"out={tmp_path / 'out'}", "progress=false", "batch=3",
            *(f"{k}={v}" for k, v in {**options, **grid}.items())]  # the grid as generate.py's --rho ...
    result = sample(args + ([f"class={class_idx}"] if class_idx is not None else []))
    got = torch.from_numpy(np.load(result["npz"])["images"])
    diff = (got.int() - want.int()).abs()
    print(f"{case}: max uint8 difference {int(diff.max())}, equal {float((diff == 0).float().mean()):.4f}")
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) >= 0.99
    assert len({bytes(img.numpy()) for img in got}) == len(seeds)


def test_float_images_agree_to_rounding(edm, tmp_path):
    """The float images before the uint8 conversion: generate.py's and genflow's agree to float32 rounding."""
    from genflow.config import module_from_checkpoint
    from genflow.sampling import generate as genflow_generate

    generate, networks = edm
    for label_dim, class_idx, options in ((0, None, {}), (10, 2, CHURN)):
        net, ckpt = converted(networks, tmp_path, label_dim)
        solver = "stochastic" if options else "heun"
        sampler = {{"S_tmin": "S_min", "S_tmax": "S_max"}.get(k, k): v for k, v in options.items()}
        want, _ = edm_images(generate, net, list(range(8)), class_idx, num_steps=12, **sampler)
        module, dm, _ = module_from_checkpoint(ckpt)
        got = genflow_generate(module.method, module.net, range(8), dm.data_shape, steps=12, solver=solver,
                               solver_options=options or None, num_classes=dm.num_classes, class_label=class_idx)
        err = float((got.double() - want).abs().max())
        print(f"label_dim={label_dim} {solver}: max |genflow - generate.py| = {err:.3g}")
        assert err <= 2e-5, err
