"""The training run behind train.py: build, fit, then write the grid, the exports and the JSON line."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from genflow.config import GENFLOW_TRAINER_KEYS, build, forget_checkpoints, to_container, validate


def run_dir_of(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("run_dir"):  # explicit (tests, and the leaderboard, which trains inside its own Hydra app)
        return Path(cfg.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs/run")


def make_trainer(cfg: DictConfig, run_dir: Path, **overrides) -> pl.Trainer:
    """A Trainer with the callbacks of the `callbacks` group and the loggers of the `logger` group (one config
    file each); relative folders in them (dirpath, save_dir) are inside ``run_dir``."""
    from genflow.training import AtomicCheckpointIO

    callbacks = instantiate_group(cfg.get("callbacks"), run_dir)
    loggers = instantiate_group(cfg.get("logger"), run_dir)
    if not loggers:  # logger=none: the learning rate has nowhere to go (Lightning's monitor would refuse to start)
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    callbacks += run_callbacks(cfg, run_dir)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in GENFLOW_TRAINER_KEYS:  # genflow's own speed settings, applied by training.module.speed_settings
        trainer_kwargs.pop(key, None)
    trainer_kwargs.update(overrides)
    # the datamodule's ResumableSampler shards by rank itself, so Lightning must not wrap it
    return pl.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False,
                      plugins=[AtomicCheckpointIO()], use_distributed_sampler=False, **trainer_kwargs)


RUN_DIR_KEYS = ("dirpath", "save_dir")


def instantiate_group(group, run_dir: Path) -> list:
    """Instantiate every ``_target_`` node of a config group (callbacks, logger), in file order."""
    from genflow.config import instantiate

    objects = []
    for spec in (group or {}).values():
        if spec is None or "_target_" not in spec:
            continue
        in_run_dir = {k: str(run_dir / str(spec[k])) for k in RUN_DIR_KEYS
                      if k in spec and spec[k] is not None and not Path(str(spec[k])).is_absolute()}
        objects.append(instantiate(spec, **in_run_dir))
    return objects


def run_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    """The progress display every run gets (a Rich bar, or plain lines when stdout is not a terminal)."""
    from genflow.training.progress import TrainProgress

    if not cfg.trainer.get("enable_progress_bar", True):
        return []
    return [TrainProgress(every_seconds=(cfg.get("progress") or {}).get("every_seconds", 30),
                          log_path=run_dir / "train.log")]


def quiet_console() -> None:
    """Silence what carries no information for a genflow user: Lightning's device lines ("GPU available:
    False ..."), its advertisements ("Tip: ... litlogger"), its stop notice, and known third-party
    deprecation warnings that a user cannot act on."""
    import logging
    import warnings

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*deprecated.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*is smaller than the logging.*")


def settings_lines(cfg: DictConfig, module, run_dir: Path, threads: str) -> list[str]:
    from genflow.training.runs import describe

    d = describe(cfg, module.method)
    model = " ".join([d["model"]] + [f"{k}={d[k]}" for k in ("D", "path", "stage", "T", "schedule") if k in d])
    params = sum(p.numel() for p in module.net.parameters()) / 1e6
    res = f" {d['resolution']}px" if "resolution" in d else ""
    return [f"run {run_dir}",
            f"  {model} | net {d['net']} ({params:.2f} M params) | data {d['data']}{res}, batch {d['batch']}",
            f"  {d['max_steps']} steps, lr {d['lr']}, precision {d['precision']}, seed {d['seed']}, "
            f"{cfg.trainer.get('accelerator', 'cpu')}, {threads}"]


def train(cfg: DictConfig, *, validated: bool = False) -> dict:
    """Fit, then grid, exports, final metrics and the JSON line. ``validated``: the caller has already run
    ``genflow.config.validate`` on this config (train.py does so before Hydra starts the job), so the
    checkpoints are not read and the images not verified a second time."""
    from genflow.training.runs import RunFolderLock

    if not validated:
        validate(cfg)
    run_dir = run_dir_of(cfg)
    with RunFolderLock(run_dir) as lock:  # one training process per folder, released however the run ends
        return _train_in(cfg, run_dir, lock.notes)


def _train_in(cfg: DictConfig, run_dir: Path, notes: list[str]) -> dict:
    import signal
    import sys

    from pytorch_lightning.utilities import rank_zero_only

    from genflow.progress import say
    from genflow.threads import configure_threads
    from genflow.training.module import speed_settings
    from genflow.training.resume import RunCheckpoint
    from genflow.training.runs import continue_command, describe, prepare_run, write_result

    start = prepare_run(cfg, run_dir)  # refuses to overwrite a run, before any work
    forget_checkpoints()
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
    # checked when composed (genflow.config.check_trainer / check_compile)
    speed_settings(module, **{key: cfg.trainer[key] for key in GENFLOW_TRAINER_KEYS if key in cfg.trainer})
    trainer = make_trainer(cfg, run_dir, enable_model_summary=False)
    dm.check_batch_size(trainer.world_size)  # before any step: the reported batch is the one that runs
    if trainer.is_global_zero:
        for line in settings_lines(cfg, module, run_dir, threads):
            say(line, log)
    for logger in trainer.loggers:
        if start.step and hasattr(logger, "_kwargs"):  # TensorBoard: hide what a killed session logged after
            logger._kwargs.setdefault("purge_step", start.step)  # its checkpoint (the CSV logger drops it)
        logger.log_hyperparams(describe(cfg, module.method))
    began = time.perf_counter()
    # prepare_run read the checkpoint with weights_only=True already: Lightning never unpickles code either
    trainer.fit(module, datamodule=dm, ckpt_path=start.ckpt_path, weights_only=True)
    wall = time.perf_counter() - began
    stop = next(c for c in trainer.callbacks if isinstance(c, RunCheckpoint))
    if stop.stopped_by is not None:
        name = signal.Signals(stop.stopped_by).name
        say(f"stopped by {name} at step {trainer.global_step}: the state is in {stop.last_path}; continue with: "
            f"{continue_command(cfg, run_dir)}", log)
        sys.exit(128 + int(stop.stopped_by))
    # EDMEma copies the averaged weights into the module at the end of fit: what follows uses EMA weights
    if start.complete:  # outputs of a finished run are made from the weights its final.ckpt already holds
        final = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
        module.load_state_dict(final["state_dict"])
    result = finish(cfg, trainer, module, dm, run_dir, wall, steps_before=start.step)
    if trainer.is_global_zero:
        write_result(run_dir, result)
        say(json.dumps(result), log)
    return result


def finish(cfg, trainer, module, dm, run_dir: Path, wall: float, steps_before: int = 0) -> dict:
    """Exports, grid, final metrics and the result dict. ``steps_before``: the step this process resumed from,
    so the reported rate counts only the steps trained here, over this process's wall time."""
    from genflow.results.records import absolute
    from genflow.training import SampleGrid
    from genflow.training.runs import describe

    ckpt_cb = trainer.checkpoint_callback
    final_ckpt = run_dir / "checkpoints" / "final.ckpt"
    # EMA weights and the config as plain containers, no optimizer state: final.ckpt is for sampling and
    # evaluation; last.ckpt resumes training
    trainer.save_checkpoint(final_ckpt, weights_only=True)
    # Lightning moves the module back to the CPU when fit ends; the grid, the final FID/NLL and the exports
    # belong on the training device (each rank's own, for the seed-sharded FID)
    device = trainer.strategy.root_device
    module.to(device)
    grid_cb = next(c for c in trainer.callbacks if isinstance(c, SampleGrid))
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
        "grid": absolute(grid),
        **describe(cfg, module.method),
        "steps": steps,
        "steps_this_session": steps - steps_before,
        # the training loop after its warm-up steps, timed as genflow.bench train-step times a step
        "train_img_per_s": round(timed[0] * batch / timed[1], 1) if timed
        else round((steps - steps_before) * batch / max(wall, 1e-9), 1),
        "wall_s": round(wall, 1),
        **figures,
    }
    if trainer.is_global_zero:
        result.update(export_ema(cfg, module, run_dir))
    # every rank takes part: the FID shards its seeds over ranks and all-reduces the statistics
    final = final_metrics(cfg, module, dm)
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


def export_ema(cfg: DictConfig, module, run_dir: Path) -> dict:
    """EMA weights as safetensors + the resolved config as yaml, for use outside genflow (written atomically)."""
    from safetensors.torch import save_file

    from genflow.cache import atomic_write

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    path = atomic_write(run_dir / "ema.safetensors", lambda tmp: save_file(state, str(tmp)))
    OmegaConf.save(OmegaConf.create(to_container(cfg)), run_dir / "config.yaml")
    return {"ema_safetensors": os.path.abspath(path)}


def final_metrics(cfg: DictConfig, module, dm) -> dict:
    """FID of the final EMA model where the config asks for it (fid.num > 0)."""
    if not cfg.get("fid") or not cfg.fid.get("num"):
        return {}
    from genflow.config import fid_options
    from genflow.metrics import evaluate_fid

    return evaluate_fid(module, dm, device=module.device, **fid_options(cfg.fid, cfg.sample))
