"""FID while training: every ``every_n_steps`` optimizer steps, generate ``num`` images from the EMA
weights (image i from seed ``seed_start + i``, seeds sharded over ranks), log ``val/fid`` (and
``val/kid``) so that a ``ModelCheckpoint(monitor="val/fid", mode="min")`` keeps the best checkpoints.

The extractor and the reference statistics are built in ``setup`` (rank 0 computes and caches the
reference, the others read the cache), so a missing weight file fails before the first step. The
feature network lives in the callback, never in the LightningModule: it stays out of checkpoints and
out of the EMA copy.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, WeightAveraging

from genflow.errors import config_error
from genflow.metrics.evaluation import FIDEvaluator


def ema_module(trainer: "pl.Trainer", pl_module: "pl.LightningModule"):
    """The EMA copy of the module held by a WeightAveraging callback, or the module itself."""
    for cb in trainer.callbacks:
        if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None:
            return cb._average_model.module
    return pl_module


class FIDCallback(pl.Callback):
    def __init__(self, every_n_steps: int = 1000, num: int = 1000, steps: int = 18, solver: str = "heun",
                 guidance: float | None = None, batch_size: int = 256, extractor: Any = None, mode: str = "clean",
                 inception_path: str | None = None, download: bool = False, ref: str = "train",
                 cache_dir: str | None = None, kid: bool = False, kid_subset_size: int = 1000, seed_start: int = 0,
                 use_ema: bool = True, time_limit: float | None = None, at_end: bool = True,
                 monitor: str = "val/fid", progress: bool = False, precision: str = "fp32"):
        from genflow.sampling import check_precision

        if every_n_steps < 1:
            raise config_error(f"callbacks.fid.every_n_steps={every_n_steps}", "FID runs every N optimizer steps",
                               "use a positive N (e.g. 1000), or drop callbacks=fid")
        if num < 2:
            raise config_error(f"callbacks.fid.num={num}", "FID needs at least two images",
                               "use e.g. num=1000 while training (50000 for paper numbers with genflow.apps.evaluate)")
        self.every_n_steps, self.num, self.steps, self.solver = every_n_steps, num, steps, solver
        self.guidance, self.batch_size, self.seed_start = guidance, batch_size, seed_start
        self.use_ema, self.time_limit, self.at_end, self.monitor = use_ema, time_limit, at_end, monitor
        self.precision = check_precision(precision)
        self.guide = None  # autoguidance's weaker network, set by genflow.apps.train from sample.guide_ckpt
        self._evaluator_kwargs = dict(extractor=extractor, mode=mode, inception_path=inception_path,
                                      download=download, ref=ref, cache_dir=cache_dir, kid=kid,
                                      kid_subset_size=kid_subset_size, batch_size=batch_size, progress=progress)
        self.evaluator: FIDEvaluator | None = None
        self._last_step = -1
        self.history: list[dict] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if dm is not None:
            dm.setup("fit")
        self.evaluator = FIDEvaluator(dm, **self._evaluator_kwargs)
        self.evaluator.setup(pl_module.device)
        # best-FID checkpoints go next to the periodic ones unless their folder was given
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor == self.monitor and cb.dirpath is None:
                cb.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self.every_n_steps:
            return
        self._measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step != self._last_step and trainer.global_step > 0:
            # Lightning refuses self.log here; the value still reaches the loggers and callback_metrics
            self._measure(trainer, pl_module, log=False)

    def _measure(self, trainer, pl_module, log: bool = True) -> dict:
        step = trainer.global_step
        self._last_step = step
        source = ema_module(trainer, pl_module) if self.use_ema else pl_module
        dm = trainer.datamodule
        net = source.net
        was_training = net.training
        net.eval()
        start = time.perf_counter()
        seeds = range(self.seed_start, self.seed_start + self.num)
        sampled, guidance = net, self.guidance
        if self.guide is not None:  # autoguidance replaces classifier-free guidance
            from genflow.methods.base import autoguided

            sampled, guidance = autoguided(net, self.guide.to(pl_module.device), guidance), None
        stats = self.evaluator.sample_stats(source.method, sampled, seeds, tuple(dm.data_shape), steps=self.steps,
                                            solver=self.solver, guidance=guidance, batch_size=self.batch_size,
                                            device=pl_module.device, time_limit=self.time_limit,
                                            precision=self.precision)
        scores = self.evaluator.score(stats)
        net.train(was_training)
        metrics = {self.monitor: scores["fid"], f"{self.monitor}_images": float(stats.n),
                   f"{self.monitor}_seconds": time.perf_counter() - start}
        if "kid" in scores:
            metrics[self.monitor.replace("fid", "kid")] = scores["kid"]
        self.history.append({"step": step, **metrics})
        if log:
            for k, v in metrics.items():
                # every rank holds the same all-reduced value: no sync needed
                pl_module.log(k, torch.tensor(v, dtype=torch.float32), on_step=True, on_epoch=False,
                              prog_bar=(k == self.monitor), sync_dist=False)
        else:
            for k, v in metrics.items():
                trainer.callback_metrics[k] = torch.tensor(v)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        return metrics

    def state_dict(self) -> dict:
        return {"last_step": self._last_step, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self._last_step = state_dict.get("last_step", -1)
        self.history = list(state_dict.get("history", []))
