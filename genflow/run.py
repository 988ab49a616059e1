"""The training run behind train.py: build, fit, then write the grid, the exports and the JSON line."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from genflow.config import build, to_container, validate


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
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
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


def train(cfg: DictConfig) -> dict:
    validate(cfg)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module, dm = build(cfg)
    trainer = make_trainer(cfg, run_dir)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    wall = time.perf_counter() - start
    # EDMEma copies the averaged weights into the module at the end of fit: what follows uses EMA weights
    result = finish(cfg, trainer, module, dm, run_dir, wall)
    if trainer.is_global_zero:
        print(json.dumps(result), flush=True)
    return result


def finish(cfg, trainer, module, dm, run_dir: Path, wall: float) -> dict:
    from genflow.training import SampleGrid

    ckpt_cb = trainer.checkpoint_callback
    final_ckpt = run_dir / "checkpoints" / "final.ckpt"
    # EMA weights and the config as plain containers, no optimizer state: final.ckpt is for sampling and
    # evaluation; last.ckpt resumes training
    trainer.save_checkpoint(final_ckpt, weights_only=True)
    grid_cb = next(c for c in trainer.callbacks if isinstance(c, SampleGrid))
    grid = grid_cb.write(trainer, module, run_dir / "grid.png")
    figures = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items()
               if k in ("train/loss", "val/loss") or k.startswith("val/fid")}
    steps = int(trainer.global_step)
    batch = dm.batch_size * trainer.world_size
    result = {
        "run_dir": str(run_dir),
        "checkpoint": str(final_ckpt),
        "last_checkpoint": str(ckpt_cb.last_model_path) if ckpt_cb and ckpt_cb.last_model_path else None,
        "grid": str(grid),
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "data": dm.name,
        "steps": steps,
        "train_img_per_s": round(steps * batch / max(wall, 1e-9), 1),
        "wall_s": round(wall, 1),
        **figures,
    }
    if trainer.is_global_zero:
        result.update(export_ema(cfg, module, run_dir))
        result.update(final_metrics(cfg, module, dm))
    return result


def export_ema(cfg: DictConfig, module, run_dir: Path) -> dict:
    """EMA weights as safetensors + the resolved config as yaml, for use outside genflow."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    path = run_dir / "ema.safetensors"
    save_file(state, str(path))
    OmegaConf.save(OmegaConf.create(to_container(cfg)), run_dir / "config.yaml")
    return {"ema_safetensors": str(path)}


def final_metrics(cfg: DictConfig, module, dm) -> dict:
    """FID of the final EMA model where the config asks for it (fid.num > 0)."""
    if not cfg.get("fid") or not cfg.fid.get("num"):
        return {}
    from genflow.config import fid_options
    from genflow.metrics import evaluate_fid

    return evaluate_fid(module, dm, **fid_options(cfg.fid, cfg.sample))
