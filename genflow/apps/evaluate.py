"""Evaluate a checkpoint: FID with the EDM / PFGM++ protocol and/or held-out likelihood.
A Hydra app with configs/evaluate.yaml (``python -m genflow.apps.evaluate --help``):

    python -m genflow.apps.evaluate ckpt=PATH [guide_ckpt=BAD fid.guidance=W] [fid.num=50000] [fid.seed_sets=3]
        [fid.steps=18] [fid.solver=heun]
        [fid.S_churn=40 fid.S_tmin=0.05 fid.S_tmax=50 fid.S_noise=1.003] (with fid.solver=stochastic)
        [fid.mode=legacy_tensorflow] [fid.ref=train|val|STATS.npz|cleanfid:NAME] [fid.inception_path=FILE]
        [fid.kid=true] [fid.batch_size=256] [fid.time_limit=SECONDS] [fid.download=false] [precision=fp32|bf16]
        [nll=true] [sigma0=0.01] [nll_num=N] [nll_batch=256] [nll_solver=dopri5|rk4] [nll_steps=N] [nll_bits=8|none]
        [device=cuda] [data.root=DIR] [+data.<key>=value] [out=FILE.json]

FID: image i from seed i (seeds 0..N-1; set k uses kN..(k+1)N-1), the minimum over ``fid.seed_sets``
sets is reported (EDM's "best of three"), against statistics of the full training split (computed
once and cached) or a given EDM / clean-fid statistics file: with a file, nothing but the checkpoint is
read (its record of the data gives shape, classes and features; the data set is read only for
``fid.ref=train|val`` and ``nll=true``); ``guide_ckpt`` scores the model autoguided by a weaker one of the same
method and data with weight ``fid.guidance`` (``genflow.methods.base.Autoguided``). Under ``torchrun`` the seeds
are sharded over processes and the statistics all-reduced. NLL (``nll=true``) runs ``genflow.likelihood.evaluate_nll``
on the held-out split. ``data.*`` arguments override the checkpoint's stored data config (e.g. ``data.root``
on a machine where the data lives elsewhere). Everything is checked before the model is loaded. Ends with
one JSON line.

The FID is kept as it goes (``genflow.metrics.partial``): in ``<out>.partial`` beside ``out=``, or without
``out=`` in ``$GENFLOW_METRICS_HOME/partial/`` under a name made from the settings. After Ctrl-C, SIGTERM or a
full disk the same command continues where it stopped and gives the same numbers as a run that never
stopped; the file is removed once the result is written. (Not under torchrun or with ``fid.time_limit``,
whose results depend on each process and on the clock.)
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from genflow.config import (CONFIG_DIR, FID_SCHEMA, PRECISION, Bool, Float, Int, Spec, Str, build_data, build_method,
                            check_device, check_output_dir, check_schema, check_target, config_from_checkpoint,
                            read_checkpoint, run_app, sampler_options, target_class)
from genflow.config.entry import one_line_on_stop
from genflow.devices import device_name
from genflow.errors import config_error, reported
from genflow.outputs import check_record, check_writable, write_output
from genflow.progress import Phase

EVALUATE_SCHEMA = {
    "ckpt": Str(), "guide_ckpt": Str(null=True), "precision": PRECISION,
    "fid": {**FID_SCHEMA, "num": Int(0, null=True, example=50000)},
    "nll": Bool(),
    "sigma0": Float(0, lo_open=True, null=True, example=0.01),
    "nll_num": Int(1, null=True), "nll_batch": Int(1), "nll_importance": Int(1, null=True),
    "nll_divergence": Str(null=True), "nll_solver": Str(null=True), "nll_steps": Int(1, null=True),
    "nll_bits": Spec(object, null=True), "device": Str(null=True),
    "progress": Bool(null=True), "out": Str(null=True), "keep_every_s": Float(0),
}


def data_overrides(cfg: DictConfig) -> list[str]:
    """``data.key=value`` overrides of the checkpoint's config (the set, non-null ones)."""
    data = OmegaConf.to_container(cfg.get("data") or {}, resolve=True)
    return [f"data.{k}={v}" for k, v in data.items() if v is not None]


def validate(cfg: DictConfig) -> None:
    """evaluate's checks, before the model is loaded: types and ranges, the output file, the device, the
    checkpoint (readable, a genflow checkpoint), the data overrides and the solver against the model."""
    if cfg.get("ckpt") is None:
        raise config_error("no checkpoint given", "evaluate scores a trained model", "pass ckpt=PATH")
    check_schema(cfg, EVALUATE_SCHEMA, app="evaluate", open_keys=("hydra", "data"))
    if fid_num(cfg) == 0 and not cfg.nll:
        raise config_error("nothing to evaluate (fid.num=0 and nll=false)", "both FID and NLL are switched off",
                           "pass fid.num=N and/or nll=true")
    if fid_num(cfg) == 1:
        raise config_error("fid.num=1", "FID needs at least two generated images (a covariance)",
                           "use fid.num=50000 for paper numbers, or a few hundred for a quick check")
    bits = cfg.nll_bits
    if not (bits in ("auto", "none", None) or (isinstance(bits, int) and not isinstance(bits, bool) and bits > 0)):
        raise config_error(f"nll_bits={bits!r}", "nll_bits is auto, none or a positive bit depth", "use nll_bits=8")
    if cfg.out is not None:
        out = Path(str(cfg.out)).expanduser()
        if out.is_dir():
            raise config_error(f"out={cfg.out} is a folder", "out is the file the JSON line is written to",
                               "pass out=FILE.json (a file name)")
        check_output_dir(out.parent, "out's folder")  # new folders are made; a file on the way is refused
        check_record(out, cfg.ckpt)  # never another run's or checkpoint's file
        check_writable(out.parent, "out", "choose out= in a folder you can write, or make that folder writable")
    if fid_num(cfg):  # reference statistics and features are cached there during the evaluation
        from genflow.metrics.features import METRICS_HOME_ENV, metrics_home

        check_writable(metrics_home(), METRICS_HOME_ENV, f"set {METRICS_HOME_ENV} to a folder you can write "
                       "(FID reference statistics are cached there; the default is ~/.cache/genflow)")
    partial = partial_of(cfg)
    if partial is not None:  # room for the kept progress (and its next write beside it); another command's refused
        from genflow.metrics.partial import estimated_bytes

        check_writable(partial.path.parent, "out" if cfg.out else "GENFLOW_METRICS_HOME",
                       need_bytes=2 * estimated_bytes(2048, 10000 * bool(cfg.fid.kid or cfg.fid.pr)))
        partial.load(say=False)
    check_device(cfg.device)
    # the check maps the tensors; the evaluation reads the weights once
    stored = config_from_checkpoint(read_checkpoint(cfg.ckpt, mmap=True), data_overrides(cfg))
    check_target(stored.data, "data", provided=("seed",))
    data_cls = target_class(stored.data)
    if fid_num(cfg) and cfg.fid.extractor is None and getattr(data_cls, "feature_extractor", None) == "none":
        raise config_error(f"no image FID for a model of {data_cls.__name__} data",
                           "FID compares Inception (or digits-classifier) features of images; this model's samples "
                           "are not such images (2-D points, vectors, or multi-view sets)",
                           "use nll=true fid.num=0 for the held-out likelihood; compare samples of vector data with "
                           "genflow.metrics.sliced_wasserstein (docs/guide/evaluation.md); for multi-view models run "
                           "scripts/isotropic3d_consistency.py")
    if (fid_num(cfg) and str(cfg.fid.ref) in ("train", "val")) or cfg.nll:
        build_data(stored)  # this job reads the data set: its root is checked now (the record suffices otherwise)
    if fid_num(cfg):
        solver = cfg.fid.solver or (stored.get("sample") or {}).get("solver", "heun")
        build_method(stored).check_solver(solver, "fid.solver", sampler_options(cfg.fid))
    if cfg.guide_ckpt is not None:
        from genflow.config.guide import check_guide

        if not fid_num(cfg):
            raise config_error(f"guide_ckpt={cfg.guide_ckpt} with no FID to compute", "autoguidance changes "
                               "sampling only; the likelihood is the model's own", "drop guide_ckpt, or ask for FID")
        check_guide(stored, cfg.guide_ckpt)
        if cfg.fid.guidance is None:
            raise config_error(f"guide_ckpt={cfg.guide_ckpt} without fid.guidance=", "autoguidance needs its weight "
                               "w (D = D_guide + w (D_ckpt - D_guide); w = 1 is the model alone)",
                               "pass fid.guidance=W, e.g. fid.guidance=2")
    if cfg.nll and cfg.get("nll_solver"):
        from genflow.likelihood import check_likelihood_solver

        check_likelihood_solver(str(cfg.nll_solver))


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


def run_fid(module, dm, cfg, fid, device, progress: bool, guide=None, partial=None) -> dict:
    """FID of ``module``; with ``guide`` (a network), of the model autoguided by it with weight fid.guidance."""
    from genflow.config import fid_options
    from genflow.methods.base import autoguided
    from genflow.metrics import evaluate_fid

    options = fid_options(fid, cfg.get("sample"), device=device)
    if guide is not None:
        options["net"], options["guidance"] = autoguided(module.net, guide, options["guidance"]), None
    if options.get("progress") is None:
        options["progress"] = progress
    nfe = module.method.nfe(options["steps"], options["solver"])  # None: adaptive, measured below
    if options["progress"]:  # say the size of the job before it starts; the first batch then times it
        print(f"FID: generating {options['num']} images x {options['seed_sets']} seed set(s) with "
              f"{options['steps']} {options['solver']} steps (NFE {nfe or 'adaptive'}), "
              f"batch {options['batch_size']}, {options['precision']}, on {device}", file=sys.stderr, flush=True)
    if partial is not None and (partial.sets or partial.current is not None):
        print(f"FID: continuing a stopped evaluation: {partial.kept_line(options['seed_sets'], options['num'])}",
              file=sys.stderr, flush=True)
    out = evaluate_fid(module, dm, partial=partial, **options)
    out.update(steps=options["steps"], solver=options["solver"], **options["solver_options"],
               nfe=nfe if nfe is not None else out["fid_nfe"])
    return out


def run_nll(module, dm, args: DictConfig, device, progress: bool) -> dict:
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
    if args.get("nll_bits") not in ("auto", None):
        kwargs["bits"] = None if args["nll_bits"] == "none" else int(args["nll_bits"])
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


def evaluation_settings(cfg: DictConfig) -> dict:
    """What decides an evaluation's FID numbers: the checkpoints (path, size, modification time), every fid.*
    setting but the display and the clock, the network's precision and the data overrides."""
    def file(path):
        if path is None:
            return None
        p = Path(str(path)).expanduser().resolve()
        stat = p.stat() if p.is_file() else None
        return [str(p), stat and stat.st_size, stat and stat.st_mtime_ns]

    fid = OmegaConf.to_container(cfg.fid, resolve=True)
    return {"ckpt": file(cfg.ckpt), "guide_ckpt": file(cfg.get("guide_ckpt")), "precision": cfg.precision,
            **{f"fid.{k}": v for k, v in sorted(fid.items()) if k not in ("progress", "download", "time_limit")},
            "fid.num": fid_num(cfg), **dict(sorted(o.split("=", 1) for o in data_overrides(cfg)))}


def partial_of(cfg: DictConfig):
    """Where this command keeps its FID as it goes (``genflow.metrics.partial.PartialFID``), or None: no FID,
    several processes (torchrun), or a time limit."""
    from genflow.metrics.partial import PartialFID

    if not fid_num(cfg) or int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.fid.get("time_limit") is not None:
        return None
    settings = evaluation_settings(cfg)
    if cfg.out:
        out = Path(str(cfg.out)).expanduser()
        path = out.with_name(out.name + ".partial")
    else:
        from genflow.metrics.features import metrics_home

        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
        path = metrics_home() / "partial" / f"evaluate-{key}.partial"
    return PartialFID(path, settings, every_s=float(cfg.get("keep_every_s", 30)), command=this_command())


def this_command() -> str:
    """The command line that runs this evaluation again (to continue it)."""
    import shlex

    from genflow.apps.run_folder import job_overrides

    overrides = job_overrides()
    if overrides is None:
        overrides = [a for a in sys.argv[1:] if "=" in a]
    return " ".join(["python -m genflow.apps.evaluate", *map(shlex.quote, overrides)])


def fid_num(cfg: DictConfig) -> int:
    """Images per FID seed set: fid.num, or by default 50000 (none when only nll=true is asked for)."""
    return int(cfg.fid.num) if cfg.fid.num is not None else (0 if cfg.nll else 50000)


def main(cfg: DictConfig | list[str], *, validated: bool = False, partial=None, phase: Phase | None = None) -> dict:
    """Evaluate as ``python -m genflow.apps.evaluate`` does; ``cfg`` is the composed config or its overrides.
    ``partial``: the ``PartialFID`` to keep the FID in (the app's, which its signal handler sees); by default
    ``partial_of(cfg)``. ``phase``: told where the job is (for the line a stop prints)."""
    from genflow.config import compose, module_from_checkpoint
    from genflow.results.records import absolute, config_names

    if not isinstance(cfg, DictConfig):
        cfg = compose(list(cfg), "evaluate", validator=False)
    if not validated:  # the command line was checked by run_app before Hydra started the job
        validate(cfg)
    partial = partial if partial is not None else partial_of(cfg)
    if partial is not None:
        partial.load()
    cfg.fid.num = fid_num(cfg)
    want_fid, want_nll = bool(cfg.fid.num), bool(cfg.nll)
    device, rank = _init_distributed(cfg.device)
    progress = True if cfg.progress is None else bool(cfg.progress)  # a bar in a terminal, plain lines with ETA otherwise

    phase = phase or Phase()
    start = time.perf_counter()
    phase.at("loading the model")
    module, dm, stored = module_from_checkpoint(cfg.ckpt, overrides=data_overrides(cfg), device=device)
    dm.setup()
    names = config_names(stored)  # the names the training run's own line uses (genflow.results.records)
    result = {"ckpt": absolute(cfg.ckpt), "model": names.get("model", "?"), "net": names.get("net", "?"),
              "data": names.get("data", "?"), "precision": cfg.precision}
    result.update({k: v for k, v in module.method.describe().items() if k != "method"})
    if want_fid:
        # build the extractor first: a missing weight file fails before any sampling
        guide = None
        if cfg.guide_ckpt is not None:
            from genflow.config.guide import load_guide

            guide = load_guide(cfg.guide_ckpt, device)
            result.update(guide_ckpt=str(cfg.guide_ckpt), guidance=float(cfg.fid.guidance))
        phase.at("computing the FID")
        result.update(run_fid(module, dm, stored, cfg.fid, device, progress, guide, partial))
    if want_nll and rank == 0:
        phase.at("computing the likelihood")
        result.update(run_nll(module, dm, cfg, device, progress))
    result["device"] = device_name(device)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)  # first: the result of a long evaluation is never only in a file that failed
        if cfg.out:
            phase.at(f"writing {cfg.out}")
            check_record(Path(str(cfg.out)).expanduser(), cfg.ckpt)  # written meanwhile by another command?
            write_output(Path(str(cfg.out)).expanduser(), lambda tmp: tmp.write_text(line + "\n"))
        if partial is not None:  # the result is out: nothing is left to continue
            partial.remove()
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
@reported
def app(cfg: DictConfig) -> None:
    partial = partial_of(cfg)
    stops = []

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        stops.append(signum)
        if len(stops) > 1:  # the second one: at once (the file keeps its last write)
            print(f"{name} again: stopped at once; continue with: {this_command()}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        if partial is not None and partial.stop_or_defer(signum):
            print(f"\n{name}: stopping after the batch in progress, keeping what is done (send it again to stop at "
                  "once)", file=sys.stderr, flush=True)
        else:
            raise KeyboardInterrupt(signum)

    kept = (lambda: partial.kept_line(int(cfg.fid.seed_sets), fid_num(cfg))) if partial is not None \
        else "nothing is kept"
    phase = Phase("starting", kept, f"continue with: {this_command()}")
    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with one_line_on_stop(phase, sigterm=False):  # one line, no traceback: what is kept, the command that continues
            main(cfg, validated=True, partial=partial, phase=phase)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def cli() -> None:
    """The ``genflow-evaluate`` console script and ``python -m genflow.apps.evaluate``."""
    run_app(app, "evaluate", validate)


if __name__ == "__main__":
    cli()
