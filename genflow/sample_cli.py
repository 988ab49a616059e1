"""The sampling CLI behind sample.py (key=value arguments, see ``USAGE``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from genflow.errors import config_error, exit_on_error

USAGE = ("usage: python sample.py ckpt=PATH [num=64] [seeds=0-63] [steps=18] [solver=heun|euler|dopri5|stochastic|ancestral] "
         "[out=DIR] [guidance=W] [batch=256] [device=cpu|cuda] [class=K] [reference=IMAGE.png]")
KEYS = {"ckpt", "num", "seeds", "steps", "solver", "out", "guidance", "batch", "device", "class", "reference",
        "progress", "precision"}


def parse_args(argv: list[str]) -> dict:
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise config_error(f"cannot parse {bad}", "arguments are key=value pairs", USAGE)
    args = OmegaConf.to_container(OmegaConf.from_dotlist(argv))
    unknown = set(args) - KEYS
    if unknown:
        raise config_error(f"unknown argument(s) {sorted(unknown)}", f"sample.py takes {sorted(KEYS)}", USAGE)
    if "ckpt" not in args:
        raise config_error("no checkpoint given", "sample.py samples a trained model", USAGE)
    return args


def main(argv: list[str]) -> dict:
    from genflow.config import module_from_checkpoint
    from genflow.sampling import parse_seeds, sample_conditions, save_grid, to_uint8
    from genflow.training.module import check_finite_weights

    args = parse_args(argv)
    solver = args.get("solver", "heun")
    steps = int(args.get("steps", 18))
    if steps < 1:
        raise config_error(f"steps={steps}", "at least one step is needed", "use e.g. steps=18")
    if "seeds" in args:
        seeds = parse_seeds(args["seeds"])
        if "num" in args and int(args["num"]) != len(seeds):
            raise config_error(f"num={args['num']} but seeds={args['seeds']} holds {len(seeds)} seeds",
                               "each image comes from one seed", "drop num= or make it match the seed range")
    else:
        seeds = list(range(int(args.get("num", 64))))
    device = torch.device(args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.get("out", "samples"))

    module, dm, cfg = module_from_checkpoint(args["ckpt"], device=device)
    check_finite_weights(module, f"checkpoint {args['ckpt']}")
    module.method.check_solver(solver)  # each method lists the samplers it offers
    shape = tuple(dm.data_shape)
    if "reference" in args:
        if not hasattr(dm, "reference_cond"):
            raise config_error(f"reference= given for a model trained on {getattr(dm, 'name', 'this data')}",
                               "only multi-view models are conditioned on a reference image",
                               "drop reference=, or use a checkpoint trained with data=multiview")
        cond = dm.reference_cond(args["reference"], seeds, device)
    elif "class" in args:
        if not dm.num_classes:
            raise config_error("class= given for an unconditional model", "the checkpoint has no class input",
                               "drop class=, or train with data.conditional=true")
        labels = torch.full((len(seeds),), int(args["class"]), device=device)
        cond = {"class": torch.nn.functional.one_hot(labels, dm.num_classes).float()}
    else:
        cond = sample_conditions(dm, seeds, device)
    guidance = args.get("guidance")
    if guidance is not None and not cond:
        raise config_error(f"guidance={guidance} for an unconditional model", "classifier-free guidance mixes "
                           "conditional and unconditional predictions", "drop guidance=, or use a conditional model")

    start = time.perf_counter()
    samples = module.generate(seeds, shape, steps=steps, solver=solver, cond=cond,
                              guidance=None if guidance is None else float(guidance),
                              batch_size=int(args.get("batch", 256)), progress=bool(args.get("progress", True)),
                              precision=str(args.get("precision", "fp32")))
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    result = {"out": str(out), "num": len(seeds), "nfe": module.method.nfe(steps, solver), "steps": steps,
              "solver": solver, "precision": str(args.get("precision", "fp32")), "img_per_s": round(len(seeds) / max(wall, 1e-9), 2), "device": str(device)}
    if samples.ndim == 4 or samples.ndim == 5:
        import torchvision

        images = to_uint8(samples).cpu()
        for seed, img in zip(seeds, images):
            if img.ndim == 4:  # multi-view: views side by side
                img = torch.cat(list(img), dim=-1)
            torchvision.io.write_png(img, str(out / f"{seed:06d}.png"))
        np.savez(out / "samples.npz", images=images.numpy(), seeds=np.asarray(seeds))
    else:
        np.savez(out / "samples.npz", samples=samples.cpu().numpy(), seeds=np.asarray(seeds))
    if "reference" in args and Path(str(args["reference"])).suffix.lower() not in (".pt", ".pth", ".npy"):
        # one row per seed: the reference image, then the generated views
        result["grid"] = str(dm.save_reference_grid(out / "grid.png", samples, args["reference"]))
    else:
        result["grid"] = str(save_grid(samples, out / "grid.png"))
    result["npz"] = str(out / "samples.npz")
    print(json.dumps(result), flush=True)
    return result


def cli() -> None:
    import sys

    exit_on_error(main, sys.argv[1:])
