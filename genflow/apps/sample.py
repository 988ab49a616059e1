"""Sample a trained model (a Hydra app with configs/sample.yaml; ``genflow-sample --help``):

    python -m genflow.apps.sample ckpt=PATH num=64 seeds=0-63 steps=18 solver=heun out=DIR [guidance=w] [device=cuda]
    python -m genflow.apps.sample -m ckpt=PATH guidance=1,1.5,2 out=DIR     # one sub-folder of DIR per guidance
    python sample.py ...           # the same app, from the repository root

Writes one PNG per seed (images), grid.png and samples.npz, and ends with one JSON line. Image i depends only
on seed i, never on the batch size. An image model's PNGs are written batch by batch; the same command again
(after Ctrl-C, SIGTERM or a full disk) samples only the seeds whose PNG is missing or does not decode.
The checkpoint is read with weights_only=True: no code is unpickled, and its
stored config may name only genflow's registry of classes (genflow.registry).

Every argument is checked before a checkpoint is sampled or a file is written: types and ranges when the
command line is composed, the checkpoint (readable, a genflow checkpoint), the solver and its settings
(``S_churn=`` ...) against the model, ``sigma_min=``/``sigma_max=``/``rho=`` against the model's method,
``class=``/``guidance=``/``reference=`` against the model's data, ``guide_ckpt=`` (autoguidance) against
the model's method and data, and the output folder. Nothing but the
checkpoint is read (its record of the data) unless the job needs the data (multi-view conditions).
Seeds, labels and sampler noise follow EDM's generate.py, so a converted EDM network gives its images.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from genflow.config import (CONFIG_DIR, PRECISION, SAMPLER_SCHEMA, Bool, Float, Int, Spec, Str, check_device,
                            check_output_dir, check_schema, check_target, build_method, config_from_checkpoint,
                            data_conditions, read_checkpoint, run_app, sampler_options)
from genflow.config.entry import one_line_on_stop
from genflow.errors import config_error, os_error, reported
from genflow.data.record import read_record
from genflow.outputs import (check_sample_folder, check_writable, sample_bytes, sample_settings, write_output,
                             write_sample_manifest)
from genflow.progress import Phase

SAMPLE_SCHEMA = {
    "ckpt": Str(), "num": Int(1, null=True, example=64), "seeds": Spec(object, null=True), "steps": Int(1),
    "solver": Str(), "out": Str(), "guidance": Float(0, null=True), "guide_ckpt": Str(null=True), "batch": Int(1),
    "device": Str(null=True),
    "class": Int(0, null=True, example=0), "reference": Str(null=True), "precision": PRECISION, "progress": Bool(),
    **SAMPLER_SCHEMA, **{key: Float(0, lo_open=True, null=True, example=example) for key, example in
                         (("sigma_min", 0.002), ("sigma_max", 80), ("rho", 7))},
}
#: the time grid of EDM / PFGM++ (Karras et al. Eq. 5), set for sampling as generate.py's --sigma_min, --sigma_max,
#: --rho: settings of the checkpoint's method, replaced for this run (refused by a method without them)
GRID_KEYS = ("sigma_min", "sigma_max", "rho")


def grid_overrides(cfg: DictConfig) -> list[str]:
    """``model.<key>=value`` overrides of the stored method for the grid settings given on the command line."""
    return [f"model.{key}={float(cfg[key])}" for key in GRID_KEYS if cfg.get(key) is not None]


def seeds_of(cfg: DictConfig) -> list[int]:
    from genflow.sampling import parse_seeds

    if cfg.seeds is None:
        return list(range(64 if cfg.num is None else int(cfg.num)))
    spec = cfg.seeds
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    try:
        seeds = parse_seeds(spec)
    except (ValueError, TypeError) as err:
        raise config_error(f"seeds={cfg.seeds}", str(err), "write seeds as low-high (0-63), one seed (5), or a "
                           "list ([1,5,9])") from err
    if min(seeds) < 0:
        raise config_error(f"seeds={cfg.seeds} holds a negative seed", "seeds index the noise generators from 0",
                           "use seeds >= 0, e.g. seeds=0-63")
    if max(seeds) > 2 ** 64 - 1:
        raise config_error(f"seeds={cfg.seeds} holds a seed above 2^64 - 1", "a noise generator's seed is a "
                           "64-bit unsigned integer", "use seeds from 0 to 18446744073709551615")
    if len(set(seeds)) != len(seeds):
        twice = sorted({s for s in seeds if seeds.count(s) > 1})[:5]
        raise config_error(f"seeds={cfg.seeds} names seed {', '.join(map(str, twice))} more than once",
                           "image i comes from seed i: a repeated seed repeats its image and one PNG file",
                           "list each seed once")
    if cfg.num is not None and int(cfg.num) != len(seeds):
        raise config_error(f"num={cfg.num} but seeds={cfg.seeds} holds {len(seeds)} seeds",
                           "each image comes from one seed", "drop num= or make it match the seed range")
    return seeds


def validate(cfg: DictConfig) -> None:
    """sample.py's checks, run on the composed command line before anything is loaded or written."""
    if cfg.get("ckpt") is None:
        raise config_error("no checkpoint given", "sample.py samples a trained model",
                           "pass ckpt=PATH (e.g. outputs/<run>/checkpoints/final.ckpt)")
    check_schema(cfg, SAMPLE_SCHEMA, app="sample", open_keys=("hydra",))
    seeds_of(cfg)
    check_device(cfg.device)
    check_output_dir(cfg.out, "out")
    check_writable(cfg.out, "out")
    ckpt = read_checkpoint(cfg.ckpt, mmap=True)  # the check maps the tensors; the job reads the weights once
    record = read_record(ckpt, cfg.ckpt)
    if record is not None:  # room for the images, samples.npz and the grid, before any is sampled
        check_writable(cfg.out, "out", need_bytes=sample_bytes(record["data_shape"], len(seeds_of(cfg))))
    check_sample_folder(Path(str(cfg.out)).expanduser(), sample_settings(cfg, cfg.ckpt))
    stored = config_from_checkpoint(ckpt, grid_overrides(cfg))
    if grid_overrides(cfg):  # a method without a sigma grid says so (an unknown key), before anything is built
        check_target(stored.model, "model")
    # each method lists the samplers it offers, and each sampler the settings it takes
    build_method(stored).check_solver(cfg.solver, options=sampler_options(cfg))
    if cfg.guide_ckpt is not None:  # autoguidance: guidance= is its weight; the guide is compared as trained
        from genflow.config.guide import check_guide

        check_guide(config_from_checkpoint(ckpt), cfg.guide_ckpt)
        if cfg.guidance is None:
            raise config_error(f"guide_ckpt={cfg.guide_ckpt} without guidance=", "autoguidance needs its weight w "
                               "(D = D_guide + w (D_ckpt - D_guide); w = 1 is the model alone)",
                               "pass guidance=W, e.g. guidance=2")
    elif cfg.guidance is not None and not data_conditions(stored.data):
        raise config_error(f"guidance={cfg.guidance} for an unconditional model", "classifier-free guidance mixes "
                           "conditional and unconditional predictions; this checkpoint has no condition",
                           "drop guidance=, use a conditional model, or guide with a weaker model of the same "
                           "config (guide_ckpt=PATH: autoguidance)")
    if cfg["class"] is not None and not stored.data.get("conditional"):
        raise config_error(f"class={cfg['class']} for a model without class labels",
                           "the checkpoint was trained with data.conditional=false", "drop class=")


def main(cfg: DictConfig | list[str], *, validated: bool = False, phase: Phase | None = None) -> dict:
    """Sample as ``python sample.py`` does; ``cfg`` is the composed config or its overrides (``["ckpt=...", ...]``).
    ``phase``: told where the job is and what it keeps (for the line a stop prints)."""
    from genflow.config import compose, module_from_checkpoint
    from genflow.sampling import generate, nfe_per_image, sample_conditions, save_grid, to_uint8
    from genflow.training.module import check_finite_weights

    if not isinstance(cfg, DictConfig):
        cfg = compose(list(cfg), "sample", validator=False)
    if not validated:  # the command line was checked by run_app before Hydra started the job
        validate(cfg)
    seeds = seeds_of(cfg)
    solver, steps, guidance = cfg.solver, int(cfg.steps), cfg.guidance
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(cfg.out)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        out = Path(HydraConfig.get().runtime.output_dir)  # <out>/<overrides of this job>

    settings = sample_settings(cfg, cfg.ckpt)
    check_sample_folder(out, settings)  # again: a multirun job's own folder, or one written meanwhile
    phase = phase or Phase()
    phase.at("loading the model")
    module, dm, stored = module_from_checkpoint(cfg.ckpt, grid_overrides(cfg), device=device)
    check_finite_weights(module, f"checkpoint {cfg.ckpt}")
    shape = tuple(dm.data_shape)
    per_seed_png = len(shape) == 3  # an image per seed: written as it goes, kept by a re-run of the command
    done = set() if not per_seed_png else {s for s in seeds if png_ok(out / f"{s:06d}.png", shape)}
    todo = [s for s in seeds if s not in done]
    if cfg.reference is not None:
        if not hasattr(dm, "reference_cond"):
            raise config_error(f"reference={cfg.reference} for a model trained on {getattr(dm, 'name', 'this data')}",
                               "only multi-view models are conditioned on a reference image",
                               "drop reference=, or sample a multi-view (Isotropic3D) checkpoint")
        cond = dm.reference_cond(cfg.reference, todo, device)
    else:
        cond = sample_conditions(dm, todo, device)
    if cfg["class"] is not None and not 0 <= int(cfg["class"]) < dm.num_classes:
        raise config_error(f"class={cfg['class']} is out of range", f"the model knows classes 0..{dm.num_classes - 1}",
                           f"use class=0..{dm.num_classes - 1}")

    net = module.net
    if cfg.guide_ckpt is not None:  # autoguidance replaces classifier-free guidance
        from genflow.config.guide import load_guide
        from genflow.methods.base import autoguided

        net, guidance = autoguided(net, load_guide(cfg.guide_ckpt, device), guidance), None
    start, counts, options = time.perf_counter(), {}, sampler_options(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_sample_manifest(out, settings, seeds)  # first: what the images in this folder come from

    def write_batch(batch_seeds, batch):
        for seed, img in zip(batch_seeds, to_uint8(batch).cpu()):
            write_png(out / f"{seed:06d}.png", img)

    def kept() -> str:
        return f"{sum(png_ok(out / f'{s:06d}.png', shape) for s in seeds)} of {len(seeds)} images are in {out}"

    phase.at("sampling", kept if per_seed_png else "no sample was written",
             "run the same command again to sample the rest" if per_seed_png else None)
    # without class=, each image's class is drawn from its seed's generator, as EDM's generate.py draws it
    samples = generate(module.method, net, todo, shape, steps=steps, solver=solver, cond=cond,
                       guidance=None if guidance is None else float(guidance), batch_size=int(cfg.batch),
                       device=module.device, progress=bool(cfg.progress), precision=cfg.precision,
                       counts=counts, solver_options=options, num_classes=dm.num_classes,
                       class_label=cfg["class"], on_batch=write_batch if per_seed_png else None)
    phase.at("writing samples.npz and grid.png", how="run the same command again to write them" if per_seed_png
             else None)
    wall = time.perf_counter() - start
    nfe = module.method.nfe(steps, solver)  # an adaptive solver's is measured (none when nothing was sampled)
    nfe = nfe if nfe is not None else nfe_per_image(counts)
    result = {"out": str(out), "num": len(seeds), "sampled": len(todo), "kept": len(done), "nfe": nfe,
              "steps": steps, "solver": solver, **options,
              **{key: float(cfg[key]) for key in GRID_KEYS if cfg[key] is not None},
              **({} if cfg["class"] is None else {"class": int(cfg["class"])}),
              "precision": cfg.precision, "img_per_s": round(len(todo) / max(wall, 1e-9), 2),
              "device": str(device)}
    if per_seed_png:  # the set, read back from the PNGs (the bytes a continued run and a whole run share)
        samples = torch.stack([read_png(out / f"{s:06d}.png") for s in seeds])
        write_output(out / "samples.npz", lambda tmp: savez(tmp, images=samples.numpy(), seeds=np.asarray(seeds)))
    elif samples.ndim == 5:
        images = to_uint8(samples).cpu()
        for seed, img in zip(seeds, images):  # multi-view: views side by side
            write_png(out / f"{seed:06d}.png", torch.cat(list(img), dim=-1))
        write_output(out / "samples.npz", lambda tmp: savez(tmp, images=images.numpy(), seeds=np.asarray(seeds)))
    else:
        write_output(out / "samples.npz",
                     lambda tmp: savez(tmp, samples=samples.cpu().numpy(), seeds=np.asarray(seeds)))
    if cfg.reference is not None and Path(str(cfg.reference)).suffix.lower() not in (".pt", ".pth", ".npy"):
        # one row per seed: the reference image, then the generated views
        result["grid"] = str(dm.save_reference_grid(out / "grid.png", samples, cfg.reference))
    else:
        result["grid"] = str(save_grid(samples, out / "grid.png"))
    result["npz"] = str(out / "samples.npz")
    print(json.dumps(result), flush=True)
    return result


def savez(path: Path, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary file's name
        np.savez(f, **arrays)


def read_png(path: Path) -> torch.Tensor:
    import torchvision

    return torchvision.io.decode_png(torchvision.io.read_file(str(path)))


def png_ok(path: Path, shape) -> bool:
    """A PNG of a seed that an earlier run of the command wrote completely (it decodes to the model's shape)."""
    if not path.is_file():
        return False
    try:
        return tuple(read_png(path).shape) == tuple(shape)
    except (RuntimeError, OSError):
        return False


def write_png(path: Path, img: torch.Tensor) -> None:
    """One image, under its name only once it is complete (a stop never leaves half a PNG)."""
    import torchvision

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torchvision.io.write_png(img, str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise (os_error(err, path) or err) from err


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sample")
@reported
def app(cfg: DictConfig) -> None:
    with one_line_on_stop(Phase()) as phase:  # Ctrl-C or SIGTERM: what is kept and how to go on, no traceback
        main(cfg, validated=True, phase=phase)


def cli() -> None:
    """The ``genflow-sample`` console script and ``python -m genflow.apps.sample``."""
    run_app(app, "sample", validate)


if __name__ == "__main__":
    cli()
