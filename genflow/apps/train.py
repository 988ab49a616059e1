"""Train a generative model (a Hydra app with configs/train.yaml; ``genflow-train --help``):

    python -m genflow.apps.train model=pfgmpp D=128 data=digits [trainer.max_steps=N] [hydra.run.dir=DIR]
    python train.py ...            # the same app, from the repository root

Composes configs/train.yaml, builds (module, datamodule) through genflow.config.build, fits with Lightning,
writes the EMA checkpoint, a sample grid and (where configured) FID, and ends with one JSON line. A bad input
ends in `error: what / why / fix` and exit 2 before anything is built (--debug: the traceback).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from safetensors.torch import save_file

from genflow.apps.run_folder import (RunFolderLock, continue_command, describe, folder_before, method_settings,
                                     prepare_run, primary_process, write_result)
from genflow.config import (CONFIG_DIR, GENFLOW_TRAINER_KEYS, build, fid_options, instantiate, run_app, target_class,
                            to_container, validate)
from genflow.errors import WriteFailed, reported
from genflow.metrics import evaluate_fid
from genflow.outputs import FolderState, check_writable, write_output
from genflow.results.records import absolute
from genflow.progress import Phase, say
from genflow.threads import configure_threads
from genflow.training import AtomicCheckpointIO, EDMEma, SampleGrid
from genflow.training.module import speed_settings
from genflow.training.progress_bar import TrainProgress
from genflow.training.resume import RunCheckpoint


def run_dir_of(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):  # explicit (tests, and the leaderboard, which trains inside its own Hydra app)
        return Path(cfg.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs/run")


def make_trainer(cfg: DictConfig, run_dir: Path, *, start_step: int = 0, **overrides) -> pl.Trainer:
    """A Trainer with the parts every run has (the EMA, the checkpoints, the progress display: ``run_callbacks``),
    the optional callbacks of the `callbacks` group and the loggers of the `logger` group (one config file each,
    each removable: ``~callbacks.sample_grid``, ``logger=none``); relative folders in them (dirpath, save_dir) are
    inside ``run_dir``. ``start_step``: the step a resumed run continues from (TensorBoard drops what a killed
    session logged after it)."""

    loggers = instantiate_group(cfg.get("logger"), run_dir, start_step=start_step)
    callbacks = instantiate_group(cfg.get("callbacks"), run_dir)
    if not loggers:  # logger=none: the learning rate has nowhere to go (Lightning's monitor would refuse to start)
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    own = run_callbacks(cfg, run_dir)  # EMA and checkpoints first, as before; the progress display last
    callbacks = own[:2] + callbacks + own[2:]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in GENFLOW_TRAINER_KEYS:  # genflow's own speed settings, applied by training.module.speed_settings
        trainer_kwargs.pop(key, None)
    trainer_kwargs.update(overrides)
    # the datamodule's ResumableSampler shards by rank itself, so Lightning must not wrap it
    return pl.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False,
                      plugins=[AtomicCheckpointIO()], use_distributed_sampler=False, **trainer_kwargs)


RUN_DIR_KEYS = ("dirpath", "save_dir")


def instantiate_group(group, run_dir: Path, *, start_step: int = 0) -> list:
    """Instantiate every ``_target_`` node of a config group (callbacks, logger), in file order. A TensorBoard
    logger of a resumed run gets ``purge_step=start_step`` (a SummaryWriter argument)."""
    objects = []
    for spec in (group or {}).values():
        if spec is None or "_target_" not in spec:
            continue
        extra = {k: str(run_dir / str(spec[k])) for k in RUN_DIR_KEYS
                 if k in spec and spec[k] is not None and not Path(str(spec[k])).is_absolute()}
        cls = target_class(spec)
        if start_step and isinstance(cls, type) and issubclass(cls, TensorBoardLogger) and "purge_step" not in spec:
            extra["purge_step"] = start_step
        objects.append(instantiate(spec, **extra))
    return objects


def run_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    """The parts of every run, built from its top-level sections rather than the optional `callbacks` group:
    the EMA of the weights (``ema``: EDM's, or EDM2's post-hoc EMA), the checkpoints (``checkpoint``: periodic, last.ckpt on a wall-clock
    cadence and on Ctrl-C / SIGTERM) and the progress display (a Rich bar, or plain lines when stdout is not a
    terminal)."""

    ckpt = cfg.checkpoint
    parts = [ema_callback(cfg.ema, run_dir),
             RunCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step_{step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=ckpt.every_n_steps, save_top_k=ckpt.keep, save_last=True, monitor="step",
                           mode="max", every_minutes=ckpt.every_minutes)]
    if cfg.trainer.get("enable_progress_bar", True):
        parts.append(TrainProgress(every_seconds=(cfg.get("progress") or {}).get("every_seconds", 30),
                                   log_path=run_dir / "train.log"))
    return parts


def ema_callback(ema: DictConfig, run_dir: Path):
    """The run's EMA (the ``ema`` group): EDM's (``ema=edm``: half-life and ramp-up) or EDM2's power-function
    EMAs with snapshots in ``<run>/posthoc`` (``ema=posthoc``: widths ``sigma_rel``)."""
    if ema.get("sigma_rel") is not None:
        from genflow.training import PowerEma

        return PowerEma(sigma_rel=list(ema.sigma_rel), snapshot_kimg=ema.snapshot_kimg, dirpath=str(run_dir / "posthoc"))
    return EDMEma(halflife_kimg=ema.halflife_kimg, rampup=ema.rampup)


def quiet_console() -> None:
    """Silence what carries no information for a genflow user: Lightning's device lines ("GPU available:
    False ..."), its advertisements ("Tip: ... litlogger"), its stop notice, and known third-party
    deprecation warnings that a user cannot act on."""

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*deprecated.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*is smaller than the logging.*")


def settings_lines(cfg: DictConfig, module, run_dir: Path, threads: str) -> list[str]:
    d = describe(cfg, module.method)
    model = " ".join([d["model"]] + [f"{k}={v}" for k, v in method_settings(d).items()])
    params = sum(p.numel() for p in module.net.parameters()) / 1e6
    res = f" {d['resolution']}px" if "resolution" in d else ""
    return [f"run {run_dir}",
            f"  {model} | net {d['net']} ({params:.2f} M params) | data {d['data']}{res}, batch {d['batch']}",
            f"  {d['max_steps']} steps, lr {d['lr']}, precision {d['precision']}, seed {d['seed']}, "
            f"{cfg.trainer.get('accelerator', 'cpu')}, {threads}"]


def train(cfg: DictConfig, *, validated: bool = False, continue_with: str | None = None) -> dict:
    """Fit, then grid, exports, final metrics and the JSON line. ``validated``: the caller has already run
    ``genflow.config.validate`` on this config (train.py does so before Hydra starts the job), so the
    checkpoints are not read and the images not verified a second time. ``continue_with``: the command that
    continues a stopped run, where not train.py's (the leaderboard's own)."""

    read = {} if validated else validate(cfg)
    run_dir = run_dir_of(cfg)
    undo = UndoUnlessStarted(folder_before(run_dir) if primary_process() else None, run_dir)
    written = FolderState(run_dir) if undo.before is not None else None  # as Hydra left it
    try:
        with RunFolderLock(run_dir) as lock, StopOnSignal() as stop, undo:  # one process per folder, however it ends
            how = continue_with or continue_command(cfg, run_dir)
            return _stopped_or_failed(cfg, run_dir, lambda: _train_in(cfg, run_dir, lock.notes, read.get("ckpt_path"),
                                                                      stop, undo.started, how), stop, how)
    finally:
        if undo.entered:
            undo.remove_made_folders()  # once the lock file is gone
        elif written is not None:  # refused by another process's lock: its files are its own
            undo.before.put_back_unchanged(written, run_dir)


def _stopped_or_failed(cfg: DictConfig, run_dir: Path, run, stop: "StopOnSignal", how: str) -> dict:
    """``run()``; a full disk or a signal outside the steps ends in what is kept and ``how`` to go on."""
    try:
        return run()
    except WriteFailed as err:  # a full disk: the checkpoints before it are intact; say how to go on
        err.fix = err.fix.replace("run the same command again", f"continue with: {how}")
        raise
    except (Stopped, KeyboardInterrupt) as signal_:  # outside the steps: what is kept and how to go on
        signum = signal_.args[0] if signal_.args and isinstance(signal_.args[0], int) else int(signal.SIGINT)
        trained = any((run_dir / "checkpoints").glob("*.ckpt"))
        how = f"continue with: {how}" if trained else "run the same command again"
        kept = stop.kept
        if stop.partial is not None:  # the final FID's progress (the KeyboardInterrupt of its stop)
            kept += f"; of the final FID, {stop.partial.kept_line(int(cfg.fid.seed_sets), int(cfg.fid.num))}"
    say(stop.line(signum, kept, how), run_dir / "train.log" if run_dir.is_dir() else None)
    sys.exit(128 + signum)


class UndoUnlessStarted:
    """A run refused (or stopped) before its first step, or found finished already, leaves its folder as it was
    before this command (``FolderState``: Hydra's ``.hydra/`` and log, the notes, a logger's folder are undone);
    ``started()`` marks the point from which what is written is the run's. ``began``: whether it did."""

    def __init__(self, before, run_dir: Path):
        self.before, self.run_dir, self.began, self.undone, self.entered = before, run_dir, False, False, False

    def started(self) -> None:
        self.began = True

    def __enter__(self) -> "UndoUnlessStarted":  # entered once this process holds the folder's lock
        self.entered = True
        return self

    def __exit__(self, *exc) -> None:
        if self.before is not None and not self.began:
            # only the run's folder (a sweep's other runs are theirs), inside the lock, whose file the lock removes
            self.before.restore(self.run_dir)
            self.undone = True

    def remove_made_folders(self) -> None:
        if self.undone:  # never where another process holds the folder (the lock refused this one)
            self.before.remove_made_folders(self.run_dir)


class Stopped(BaseException):
    """SIGINT or SIGTERM outside the training steps (start-up, final checkpoint, grid, exports, final FID). Not a
    KeyboardInterrupt, which Lightning would turn into exit status 1 without a word."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopOnSignal(Phase):
    """Ctrl-C and SIGTERM stop the run at once where no step is in progress (``RunCheckpoint`` takes them over
    during the steps and hands them back), each write being atomic: what is written stays, ``ckpt_path=last``
    makes the rest. A second signal stops even the clean-up, with one line. ``phase`` and ``kept`` say where it
    stopped and what is there."""

    def __init__(self):
        super().__init__("starting", "nothing was trained yet")
        self.signals, self.before = [], {}
        self.partial = None  # the final FID's PartialFID while it runs: a stop waits for its batch in progress

    def at(self, phase: str, kept: str | None = None, partial=None) -> None:
        super().at(phase, kept)
        self.partial = partial

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        name = signal.Signals(signum).name
        if len(self.signals) > 1:
            print(f"{name} again: stopped at once", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        if self.partial is not None and self.partial.stop_or_defer(signum):
            print(f"\n{name}: stopping after the FID batch in progress, keeping what is done (send it again to stop "
                  "at once)", file=sys.stderr, flush=True)
            return
        raise Stopped(signum)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self.before = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.before.items():
            signal.signal(sig, handler)


def _train_in(cfg: DictConfig, run_dir: Path, notes: list[str], resume=None, stopper: StopOnSignal | None = None,
              started=lambda: None, how: str | None = None) -> dict:
    """The run in its folder; ``started()`` is called once every check has passed, before the first step (what
    was written before it is undone if the run is refused or stopped)."""
    stopper = stopper or StopOnSignal()
    if cfg.sample.get("guide_ckpt") is not None:  # autoguided grids and FIDs: the guide fits this run
        from genflow.config.guide import check_guide

        check_guide(cfg, cfg.sample.guide_ckpt, key="sample.guide_ckpt", good_key="this run")
    start = prepare_run(cfg, run_dir, resume)  # refuses to overwrite a run, before any work
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    for note in notes + start.notes if rank_zero_only.rank == 0 else ():
        say(note, log)
    if start.finished is not None:
        print(json.dumps(start.finished), flush=True)
        return start.finished
    quiet_console()
    threads = configure_threads()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module, dm = build(cfg)
    if rank_zero_only.rank == 0:  # room for a checkpoint beside the previous one and a periodic one, before step 1
        check_writable(run_dir, "hydra.run.dir", need_bytes=3 * checkpoint_bytes(module))
    # checked when composed (genflow.config.check_trainer / check_compile)
    speed_settings(module, **{key: cfg.trainer[key] for key in GENFLOW_TRAINER_KEYS if key in cfg.trainer})
    trainer = make_trainer(cfg, run_dir, start_step=start.step, enable_model_summary=False)
    dm.check_batch_size(trainer.world_size)  # before any step: the reported batch is the one that runs
    if cfg.sample.get("guide_ckpt") is not None:  # autoguided grids and FIDs (checked against the run in train)
        from genflow.config.guide import load_guide
        from genflow.training import FIDCallback

        guide = load_guide(cfg.sample.guide_ckpt, trainer.strategy.root_device)
        for callback in trainer.callbacks:
            if isinstance(callback, (SampleGrid, FIDCallback)):
                callback.guide = guide
    if trainer.is_global_zero:
        for line in settings_lines(cfg, module, run_dir, threads):
            say(line, log)
    for logger in trainer.loggers:
        logger.log_hyperparams(describe(cfg, module.method))
    started()  # from here on, what is written is the run's
    began = time.perf_counter()
    if start.ckpt_path is not None:
        stopper.at("resuming", f"the checkpoints in {run_dir / 'checkpoints'} are kept")
    # prepare_run read the checkpoint with weights_only=True already: Lightning never unpickles code either
    trainer.fit(module, datamodule=dm, ckpt_path=start.ckpt_path, weights_only=True)
    wall = time.perf_counter() - began
    stop = next(c for c in trainer.callbacks if isinstance(c, RunCheckpoint))
    if stop.stopped_by is not None:
        name = signal.Signals(stop.stopped_by).name
        say(f"stopped by {name} at step {trainer.global_step}: the state is in {stop.last_path}; continue with: "
            f"{how or continue_command(cfg, run_dir)}", log)
        sys.exit(128 + int(stop.stopped_by))
    # EDMEma copies the averaged weights into the module at the end of fit: what follows uses EMA weights
    if start.complete:  # outputs of a finished run are made from its final (EMA) weights
        final = torch.load(start.final_weights, map_location="cpu", weights_only=True)
        module.load_state_dict(final["state_dict"])
    stopper.at("finishing", f"training is complete (step {trainer.global_step}, {run_dir / 'checkpoints'})")
    result = finish(cfg, trainer, module, dm, run_dir, wall, steps_before=start.step, keep=start.complete,
                    phase=stopper.at)
    if trainer.is_global_zero:
        stopper.at("writing result.json")
        write_result(run_dir, result)
        (run_dir / "fid.partial").unlink(missing_ok=True)  # the final FID is in result.json
        say(json.dumps(result), log)
    return result


def checkpoint_bytes(module) -> int:
    """About the size of a resumable checkpoint: the weights, their EMA and the optimizer's two moments (Adam),
    and the buffers twice."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return 4 * params + 2 * buffers + (1 << 20)


def finish(cfg, trainer, module, dm, run_dir: Path, wall: float, steps_before: int = 0, keep: bool = False,
           phase=lambda name, **kw: None) -> dict:
    """Exports, grid, final metrics and the result dict. ``steps_before``: the step this process resumed from,
    so the reported rate counts only the steps trained here, over this process's wall time. ``keep``: the outputs
    of a run trained to the end before (stopped while writing them): those already there are kept as they are,
    the missing ones made. ``phase(name)`` is told what is being done (for the line a stop prints)."""

    ckpt_cb = trainer.checkpoint_callback
    final_ckpt = run_dir / "checkpoints" / "final.ckpt"
    # EMA weights and the config as plain containers, no optimizer state: final.ckpt is for sampling and
    # evaluation; last.ckpt resumes training
    if not (keep and final_ckpt.is_file()):
        phase("writing final.ckpt")
        trainer.save_checkpoint(final_ckpt, weights_only=True)
    # Lightning moves the module back to the CPU when fit ends; the grid, the final FID/NLL and the exports
    # belong on the training device (each rank's own, for the seed-sharded FID)
    device = trainer.strategy.root_device
    module.to(device)
    grid_cb = next((c for c in trainer.callbacks if isinstance(c, SampleGrid)), None)  # ~callbacks.sample_grid: none
    grid = None
    if grid_cb is not None and keep and (run_dir / "grid.png").is_file():
        grid = run_dir / "grid.png"
    elif grid_cb is not None:
        phase("drawing the final grid")
        grid = grid_cb.write(trainer, module, run_dir / "grid.png")
    figures = {k: finite_or_none(v) for k, v in trainer.callback_metrics.items()
               if k in ("train/loss", "val/loss") or k.startswith("val/fid")}
    steps = int(trainer.global_step)
    batch = dm.batch_size * trainer.world_size
    timed = module.timed_steps() if hasattr(module, "timed_steps") else None
    result = {
        # absolute paths (genflow.results.records): the line is read from other folders and machines' logs
        "run_dir": absolute(run_dir),
        "checkpoint": absolute(final_ckpt),
        "last_checkpoint": absolute(ckpt_cb.last_model_path) if ckpt_cb and ckpt_cb.last_model_path else None,
        "grid": absolute(grid),  # None when ~callbacks.sample_grid removed the grid
        **describe(cfg, module.method),
        "steps": steps,
        "steps_this_session": steps - steps_before,
        # the training loop after its warm-up steps, timed as genflow.apps.bench train-step times a step
        "train_img_per_s": round(timed[0] * batch / timed[1], 1) if timed
        else round((steps - steps_before) * batch / max(wall, 1e-9), 1),
        "wall_s": round(wall, 1),
        **figures,
    }
    if trainer.is_global_zero:
        phase("exporting ema.safetensors and config.yaml")
        result.update(export_ema(cfg, module, run_dir, keep=keep))
    # every rank takes part: the FID shards its seeds over ranks and all-reduces the statistics
    partial = final_fid_partial(cfg, run_dir, trainer.world_size)
    if cfg.get("fid") and cfg.fid.get("num"):
        phase("computing the final FID", partial=partial)
    final = final_metrics(cfg, module, dm, partial)
    if trainer.is_global_zero:
        result.update(final)
        log_final(trainer, final)
    # valid JSON: a non-finite number is written as null, never NaN
    return {k: finite_or_none(v) if isinstance(v, (float, torch.Tensor)) else v for k, v in result.items()}


def finite_or_none(value) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def log_final(trainer, final: dict) -> None:
    """The final FID / NLL into TensorBoard and the CSV log, at the last step."""
    numbers = {f"final/{k}": float(v) for k, v in final.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numbers:
        return
    for logger in trainer.loggers:
        logger.log_metrics(numbers, step=trainer.global_step)
        logger.save()


def export_ema(cfg: DictConfig, module, run_dir: Path, keep: bool = False) -> dict:
    """EMA weights as safetensors + the resolved config as yaml, for use outside genflow (written atomically;
    ``keep``: files already there are kept)."""

    path = run_dir / "ema.safetensors"
    if not (keep and path.is_file()):
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        write_output(path, lambda tmp: save_file(state, str(tmp)))
    if not (keep and (run_dir / "config.yaml").is_file()):
        config = OmegaConf.create(to_container(cfg))
        write_output(run_dir / "config.yaml", lambda tmp: OmegaConf.save(config, tmp))
    return {"ema_safetensors": os.path.abspath(path)}


def final_metrics(cfg: DictConfig, module, dm, partial=None) -> dict:
    """FID of the final EMA model where the config asks for it (fid.num > 0); ``partial``: a
    ``genflow.metrics.partial.PartialFID`` that keeps it as it goes."""
    if not cfg.get("fid") or not cfg.fid.get("num"):
        return {}

    from genflow.config.guide import sampling_net

    options = fid_options(cfg.fid, cfg.sample)
    options["net"], options["guidance"] = sampling_net(module.net, options["guidance"],
                                                       cfg.sample.get("guide_ckpt"), module.device)
    return evaluate_fid(module, dm, device=module.device, partial=partial, **options)


def final_fid_partial(cfg: DictConfig, run_dir: Path, world_size: int):
    """Where the final FID is kept as it goes (``<run>/fid.partial``, one process only), taken up when it belongs
    to this run's final weights and FID settings (else started over, with one line)."""
    from genflow.errors import ConfigError
    from genflow.metrics.partial import PartialFID

    if not cfg.get("fid") or not cfg.fid.get("num") or world_size > 1 or cfg.fid.get("time_limit") is not None:
        return None
    final = run_dir / "checkpoints" / "final.ckpt"
    stat = final.stat()
    settings = {"final.ckpt": [stat.st_size, stat.st_mtime_ns],
                **{f"fid.{k}": v for k, v in sorted(to_container(cfg.fid).items())
                   if k not in ("progress", "download", "time_limit")},
                "sample": to_container(cfg.sample)}
    partial = PartialFID(run_dir / "fid.partial", settings, every_s=30.0)
    try:
        return partial.load()
    except ConfigError:  # the FID of earlier final weights (the run trained further since): not this one's
        say(f"{partial.path} belongs to earlier final weights: computing the final FID anew", None)
        partial.remove()
        return PartialFID(run_dir / "fid.partial", settings, every_s=30.0)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@reported
def app(cfg: DictConfig) -> None:
    train(cfg, validated=True)  # run_app checked this command line (every job of a sweep) before Hydra ran


def cli() -> None:
    """The ``genflow-train`` console script and ``python -m genflow.apps.train``."""
    run_app(app, "train")


if __name__ == "__main__":
    cli()
