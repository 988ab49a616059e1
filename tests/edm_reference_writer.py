"""Writes network snapshots with the classes of an NVlabs EDM (or PFGM++) checkout, and their outputs.

Run by tests/test_convert.py in a subprocess (so EDM's top-level packages ``dnnlib``, ``torch_utils`` and
``training`` never enter the test process):

    python tests/edm_reference_writer.py --repo EDM_DIR --kind edm --out FOLDER

For each case of ``CASES`` (or ``PFGMPP_CASES`` with ``--kind pfgmpp``; ``--cases full`` for
``FULL_CASES``, the published networks' architectures at full size) it builds the network with the
checkout's own ``training.networks`` classes and random weights, writes the snapshot the way the checkout's
training loop does, and saves the network's denoiser output on fixed inputs next to it
(``CASE.io.pt``: x, sigma, class_labels, augment_labels, denoised), computed by the checkout's own forward.
Nothing of EDM is copied here: the script only imports the checkout.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import pickle
import sys
import types
from pathlib import Path

import torch

#: tiny networks on 8x8x1 images (genflow's bundled digits) or 16x16x3, with the keyword arguments EDM's
#: train.py passes for each --arch
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4])
NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[4])
ADM = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])

#: name -> (preconditioning class, network kwargs, resolution, channels, label_dim, augment_dim)
CASES = {
    "ddpmpp-uncond-edm": ("EDMPrecond", DDPMPP, 8, 1, 0, 9),
    "ddpmpp-cond-edm": ("EDMPrecond", DDPMPP, 8, 1, 10, 0),
    "ddpmpp-uncond-vp": ("VPPrecond", DDPMPP, 8, 1, 0, 0),
    "ddpmpp-cond-vp": ("VPPrecond", DDPMPP, 8, 1, 10, 9),
    "ncsnpp-uncond-edm": ("EDMPrecond", NCSNPP, 8, 1, 0, 0),
    "ncsnpp-cond-edm": ("EDMPrecond", NCSNPP, 8, 1, 10, 9),
    "ncsnpp-uncond-ve": ("VEPrecond", NCSNPP, 8, 1, 0, 0),
    "adm-cond-edm": ("EDMPrecond", ADM, 8, 1, 10, 0),
    "adm-uncond-edm": ("EDMPrecond", ADM, 8, 1, 0, 9),
    "adm-cond-iddpm": ("iDDPMPrecond", ADM, 8, 1, 10, 0),
    # FFHQ/AFHQv2's recipe (--cres=1,2,2,2 --dropout=0.05 --augment=0.15), shrunk, on 16x16 RGB images
    "ddpmpp-rgb16-edm": ("EDMPrecond", dict(DDPMPP, channel_mult=[1, 2, 2], attn_resolutions=[8], dropout=0.05),
                         16, 3, 0, 9),
}

#: the published networks' architectures at full size (EDM's train.py options of each edm-*.pkl), random
#: weights: not part of the test suite (seconds to minutes each on a CPU); run with --kind edm --cases full
FULL_CASES = {
    "cifar10-uncond-vp": ("EDMPrecond", dict(DDPMPP, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                                             attn_resolutions=[16]), 32, 3, 0, 9),
    "cifar10-cond-ve": ("EDMPrecond", dict(NCSNPP, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                                           attn_resolutions=[16]), 32, 3, 10, 9),
    "ffhq64-uncond-vp": ("EDMPrecond", dict(DDPMPP, model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4,
                                            attn_resolutions=[16], dropout=0.05), 64, 3, 0, 9),
    "imagenet64-cond-adm": ("EDMPrecond", dict(ADM, model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                                               attn_resolutions=[32, 16, 8], dropout=0.1, use_fp16=True),
                            64, 3, 1000, 0),
}

#: PFGM++'s train.py: --pfgmpp and --aug_dim reach EDMPrecond as pfgmpp= and D=
PFGMPP_CASES = {
    "ncsnpp-uncond-D2048": ("EDMPrecond", NCSNPP, 8, 1, 0, 0, dict(pfgmpp=True, D=2048)),
    "ncsnpp-cond-D128": ("EDMPrecond", NCSNPP, 8, 1, 10, 0, dict(pfgmpp=True, D=128)),
    "ddpmpp-uncond-D128": ("EDMPrecond", DDPMPP, 8, 1, 0, 9, dict(pfgmpp=True, D=128)),
    "ncsnpp-uncond-Dinf": ("EDMPrecond", NCSNPP, 8, 1, 0, 0, dict(pfgmpp=False, D=128)),
}


def shim_environment() -> list[str]:
    """What EDM's 2022 code needs to import on a current Python: dnnlib.util imports ``distutils`` (removed
    in Python 3.12) and ``requests`` (only for downloads). Stand-ins are added only where missing."""
    added = []
    try:
        import distutils.util  # noqa: F401
    except ImportError:
        distutils = types.ModuleType("distutils")
        util = types.ModuleType("distutils.util")
        util.strtobool = lambda v: {"y": 1, "yes": 1, "t": 1, "true": 1, "on": 1, "1": 1}.get(str(v).lower(), 0)
        distutils.util = util
        sys.modules.update({"distutils": distutils, "distutils.util": util})
        added.append("distutils.util")
    if importlib.util.find_spec("requests") is None:  # looked up, not imported: no test depends on it
        sys.modules["requests"] = types.ModuleType("requests")
        added.append("requests")
    return added


def randomize(net: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: EDM zero-initialises some layers, which would hide mapping mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def inputs(res: int, ch: int, label_dim: int, augment_dim: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, ch, res, res, generator=g) * 3
    sigma = torch.tensor([0.002, 0.05, 0.5, 2.0, 20.0, 80.0])
    labels = torch.nn.functional.one_hot(torch.arange(6) % label_dim, label_dim).float() if label_dim else None
    augment = torch.randn(6, augment_dim, generator=g) if augment_dim else None
    return dict(x=x, sigma=sigma, class_labels=labels, augment_labels=augment)


def write_case(name, spec, out: Path, kind: str, seed: int) -> None:
    import dnnlib
    from training import augment, loss, networks

    precond, net_kwargs, res, ch, label_dim, augment_dim, *extra = spec
    kwargs = dict(dict(use_fp16=False, dropout=0.13), **net_kwargs)
    if augment_dim:
        kwargs["augment_dim"] = augment_dim
    interface = dict(img_resolution=res, img_channels=ch, label_dim=label_dim, **(extra[0] if extra else {}))
    torch.manual_seed(seed)  # EDM's initialisation draws from the global generator
    net = getattr(networks, precond)(**kwargs, **interface)
    randomize(net, seed)
    net.eval()
    io = inputs(res, ch, label_dim, augment_dim, seed + 1)
    with torch.no_grad():
        denoised = net(io["x"], io["sigma"], io["class_labels"], augment_labels=io["augment_labels"])
    torch.save(dict(io, denoised=denoised), out / f"{name}.io.pt")

    loss_name = {"EDMPrecond": "EDMLoss", "VPPrecond": "VPLoss", "VEPrecond": "VELoss"}.get(precond, "EDMLoss")
    dataset_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/x.zip",
                                     use_labels=bool(label_dim), xflip=False, cache=True, resolution=res,
                                     max_size=50000)
    augment_pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                                       translate_frac=1) if augment_dim else None
    if kind == "edm":
        loss_fn = getattr(loss, loss_name)()
        # EDM's training_loop: modules deep-copied, put in eval mode without gradients, moved to the CPU
        data = dict(ema=net, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
        for key, value in data.items():
            if isinstance(value, torch.nn.Module):
                data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
        with open(out / f"{name}.pkl", "wb") as f:
            pickle.dump(data, f)
        return
    # PFGM++'s training_loop: torch.save(dict(optimizer_state, step, ema, net)) as training-state-*.pt
    train_net = copy.deepcopy(net).train().requires_grad_(True)
    optimizer = torch.optim.Adam(train_net.parameters(), lr=1e-4)
    for p in train_net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    torch.save(dict(optimizer_state=optimizer.state_dict(), step=1000, ema=ema, net=train_net),
               out / f"{name}.pt")
    # the same network in EDM's snapshot layout, with PFGM++'s loss object (its options as a dnnlib.EasyDict)
    opts = dnnlib.EasyDict(pfgmpp=interface.get("pfgmpp", False), aug_dim=interface.get("D", 128), lsun=False)
    loss_fn = loss.EDMLoss(D=interface.get("D", 128), N=ch * res * res, opts=opts)
    data = dict(ema=copy.deepcopy(net).eval().requires_grad_(False).cpu(), loss_fn=loss_fn,
                augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
    with open(out / f"{name}.pkl", "wb") as f:
        pickle.dump(data, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    parser.add_argument("--kind", choices=("edm", "pfgmpp"), default="edm")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shims = shim_environment()
    sys.path.insert(0, str(Path(args.repo).resolve()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default = CASES if args.kind == "edm" else PFGMPP_CASES
    cases = {**default, **FULL_CASES} if args.kind == "edm" else default
    wanted = list(FULL_CASES) if args.cases == "full" else [c for c in args.cases.split(",") if c] or list(default)
    for i, name in enumerate(wanted):
        write_case(name, cases[name], out, args.kind, seed=100 + 10 * i)
    import numpy

    (out / "writer.json").write_text(json.dumps(dict(cases=wanted, shims=shims, numpy=numpy.__version__,
                                                     torch=torch.__version__)))


if __name__ == "__main__":
    main()
