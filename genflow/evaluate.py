"""Evaluate a checkpoint: FID with the EDM / PFGM++ protocol and/or held-out likelihood.

    python -m genflow.evaluate ckpt=PATH [fid.num=50000] [fid.seed_sets=3] [fid.steps=18] [fid.solver=heun]
        [fid.mode=legacy_tensorflow] [fid.ref=train|val|STATS.npz|cleanfid:NAME] [fid.inception_path=FILE]
        [fid.kid=true] [fid.batch=256] [fid.time_limit=SECONDS] [fid.download=false]
        [nll=true] [sigma0=0.01] [nll_num=N] [nll_batch=256] [nll_solver=dopri5|rk4] [nll_steps=N] [nll_bits=8|none] [device=cuda] [data.root=...]

FID: image i from seed i (seeds 0..N-1; set k uses kN..(k+1)N-1), the minimum over ``fid.seed_sets``
sets is reported (EDM's "best of three"), against statistics of the full training split (computed
once and cached) or a given EDM / clean-fid statistics file. Under ``torchrun`` the seeds are sharded
over processes and the statistics all-reduced. NLL (``nll=true``) runs ``genflow.likelihood.evaluate_nll``
on the held-out split. Other ``group.key=value`` arguments override the checkpoint's stored config
(e.g. ``data.root`` on a machine where the data lives elsewhere). Ends with one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import torch
from omegaconf import OmegaConf

from genflow.errors import config_error, exit_on_error

FID_KEYS = {"num", "seed_start", "seed_sets", "steps", "solver", "guidance", "batch", "extractor", "mode",
            "inception_path", "download", "ref", "cache_dir", "kid", "time_limit", "progress", "precision"}
TOP_KEYS = {"ckpt", "fid", "nll", "sigma0", "nll_num", "nll_batch", "nll_importance", "nll_divergence", "nll_solver", "nll_steps", "nll_bits",
            "device", "progress", "out"}
USAGE = ("usage: python -m genflow.evaluate ckpt=PATH [fid.num=50000] [fid.seed_sets=3] [fid.steps=18] "
         "[fid.mode=clean|legacy_tensorflow] [fid.ref=train] [nll=true] [sigma0=S] [device=cuda] [data.root=...]")


def parse_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """(our arguments, overrides for the checkpoint's config)."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise config_error(f"cannot parse {bad}", "arguments are key=value pairs", USAGE)
    ours, overrides = [], []
    for a in argv:
        key = a.split("=", 1)[0]
        top = key.split(".", 1)[0]
        (ours if top in TOP_KEYS else overrides).append(a)
    for a in overrides:
        if "." not in a.split("=", 1)[0]:
            raise config_error(f"unknown argument {a!r}", f"evaluate takes {sorted(TOP_KEYS)} and fid.<key>, "
                               "plus group.key=value overrides of the checkpoint's config", USAGE)
    args = OmegaConf.to_container(OmegaConf.from_dotlist(ours), resolve=True)
    if "ckpt" not in args:
        raise config_error("no checkpoint given", "evaluate scores a trained model", USAGE)
    fid = args.get("fid")
    if fid is not None and not isinstance(fid, (dict, bool)):
        raise config_error(f"fid={fid!r}", "fid is a group of options (fid.num=...) or false", USAGE)
    if isinstance(fid, dict):
        unknown = set(fid) - FID_KEYS
        if unknown:
            raise config_error(f"unknown fid option(s) {sorted(unknown)}", f"fid takes {sorted(FID_KEYS)}", USAGE)
    return args, overrides


def _init_distributed(device_arg):
    """Join the process group when launched by torchrun; returns (device, rank)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, rank


def run_fid(module, dm, cfg, fid: dict, device, progress: bool) -> dict:
    from genflow.metrics import evaluate_fid

    sample_cfg = cfg.get("sample") or {}
    steps = int(fid.get("steps", sample_cfg.get("steps", 18)))
    solver = str(fid.get("solver", sample_cfg.get("solver", "heun")))
    guidance = fid.get("guidance", sample_cfg.get("guidance"))
    num, sets, batch = int(fid.get("num", 50000)), int(fid.get("seed_sets", 1)), int(fid.get("batch", 256))
    if progress:  # say the size of the job before it starts; the first batch then times it (genflow.progress)
        print(f"FID: generating {num} images x {sets} seed set(s) with {steps} {solver} steps "
              f"(NFE {_nfe(module, steps, solver)}), batch {batch}, on {device}", file=sys.stderr, flush=True)
    out = evaluate_fid(module, dm, num=int(fid.get("num", 50000)), seed_start=int(fid.get("seed_start", 0)),
                       seed_sets=int(fid.get("seed_sets", 1)), steps=steps, solver=solver,
                       guidance=None if guidance is None else float(guidance), batch_size=int(fid.get("batch", 256)),
                       device=device, time_limit=fid.get("time_limit"), extractor=fid.get("extractor"),
                       mode=str(fid.get("mode", "clean")), inception_path=fid.get("inception_path"),
                       download=bool(fid.get("download", False)), ref=str(fid.get("ref", "train")),
                       cache_dir=fid.get("cache_dir"), kid=bool(fid.get("kid", False)),
                       progress=bool(fid.get("progress", progress)),
                       precision=str(fid.get("precision", "fp32")))
    out.update(steps=steps, solver=solver, nfe=_nfe(module, steps, solver))
    return out


def _nfe(module, steps: int, solver: str):
    try:
        return int(module.method.nfe(steps, solver))
    except (AttributeError, TypeError, ValueError):
        return None


def run_nll(module, dm, args: dict, device, progress: bool) -> dict:
    from genflow.likelihood import evaluate_nll

    x = dm.val_tensor()
    if x.shape[0] == 0:
        raise config_error(f"data={getattr(dm, 'name', '?')} has no held-out split", "nll=true scores held-out data",
                           "set data.val_fraction>0 (e.g. data.val_fraction=0.1) in the overrides")
    if args.get("nll_num"):
        x = x[: int(args["nll_num"])]
    kwargs = dict(batch_size=int(args.get("nll_batch", 256)), progress=progress)
    if args.get("sigma0") is not None:
        kwargs["sigma0"] = float(args["sigma0"])
    if args.get("nll_importance"):
        kwargs["importance_samples"] = int(args["nll_importance"])
    if args.get("nll_divergence"):
        kwargs["divergence"] = str(args["nll_divergence"])
    if args.get("nll_solver"):
        kwargs["solver"] = str(args["nll_solver"])
    if "nll_bits" in args:
        kwargs["bits"] = None if args["nll_bits"] in (None, "none", 0) else int(args["nll_bits"])
    elif getattr(dm, "levels", None):
        kwargs["levels"] = int(dm.levels)  # the datamodule knows its quantization (17 grey levels for digits)
    else:
        kwargs["bits"] = None  # continuous data: the clean likelihood, no dequantisation
    if args.get("nll_steps"):
        kwargs["steps"] = int(args["nll_steps"])
    was_training = module.net.training
    module.net.eval()
    result = evaluate_nll(module.method, module.net, x.to(device), **kwargs)
    module.net.train(was_training)
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in result.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    from genflow.config import module_from_checkpoint

    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    fid = args.get("fid")
    want_nll = bool(args.get("nll", False))
    # FID runs unless switched off (fid=false / fid.num=0) or only nll=true was asked for
    want_fid = fid is not False and not (want_nll and fid is None)
    fid = fid if isinstance(fid, dict) else {}
    if want_fid and int(fid.get("num", 50000)) == 0:
        want_fid = False
    if not (want_fid or want_nll):
        raise config_error("nothing to evaluate", "both FID and NLL are switched off", USAGE)
    device, rank = _init_distributed(args.get("device"))
    progress = bool(args.get("progress", True))  # a bar in a terminal, plain lines with ETA otherwise

    start = time.perf_counter()
    module, dm, cfg = module_from_checkpoint(args["ckpt"], overrides=overrides, device=device)
    dm.setup()
    result = {"ckpt": str(args["ckpt"]), "model": str(cfg.model.get("_target_", "?")).rsplit(".", 1)[-1],
              "data": getattr(dm, "name", "?")}
    result.update({k: v for k, v in module.method.describe().items() if k != "method"})
    if want_fid:
        # build the extractor first: a missing weight file fails before any sampling
        result.update(run_fid(module, dm, cfg, fid, device, progress))
    if want_nll and rank == 0:
        result.update(run_nll(module, dm, args, device, progress))
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["wall_s"] = round(time.perf_counter() - start, 2)
    if rank == 0:
        line = json.dumps(result)
        if args.get("out"):
            with open(args["out"], "w") as f:
                f.write(line + "\n")
        print(line, flush=True)
    return result


if __name__ == "__main__":
    exit_on_error(main)
