"""Callbacks: EDM's EMA on Lightning's weight averaging, sample grids, atomic checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.plugins.io import TorchCheckpointIO

from genflow.cache import atomic_write, save_checkpoint


def lerp_average(averaged: list, current: list, weight: float) -> None:
    """One EMA update of Lightning's averaged tensors: floating-point ones move ``weight`` of the way to the current
    ones (one fused lerp over all of them, no host sync); the others (counters) are copied."""
    floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
    if floats:
        avg, cur = zip(*floats)
        torch._foreach_lerp_(list(avg), list(cur), weight)
    for a, c in zip(averaged, current):
        if not a.is_floating_point():
            a.copy_(c)


class EDMEma(WeightAveraging):
    """EMA with EDM's half-life and ramp-up.

    After ``n`` images the half-life is ``min(halflife_kimg * 1000, rampup * n)`` images and
    ``beta = 0.5 ** (batch / halflife)``; ``rampup=None`` disables the ramp. The decay is computed on the
    host from the step counter, so the update is one fused lerp per tensor and no host sync.
    """

    def __init__(self, halflife_kimg: float = 500.0, rampup: float | None = 0.05, batch_size: int | None = None):
        self.halflife_kimg, self.rampup, self.batch_size = halflife_kimg, rampup, batch_size
        self._beta = 0.0
        super().__init__(use_buffers=True, multi_avg_fn=self._lerp)

    def _lerp(self, averaged: list, current: list, num_averaged) -> None:
        lerp_average(averaged, current, 1.0 - self._beta)

    def beta(self, images_seen: float, batch: int) -> float:
        halflife = self.halflife_kimg * 1000.0
        if self.rampup is not None:
            halflife = min(halflife, images_seen * self.rampup)
        return 0.5 ** (batch / max(halflife, 1e-8))

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        if step_idx is None:
            return False
        trainer = self._trainer
        batch = self.batch_size or trainer.train_dataloader.batch_size
        batch *= trainer.world_size * trainer.accumulate_grad_batches
        self._beta = self.beta((step_idx + 1) * batch, batch)
        return True

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        super().setup(trainer, pl_module, stage)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through ``genflow.cache.save_checkpoint``: the sha256 of its tensors is stored
    inside (readers verify it), and the file is a temporary one, flushed, renamed into place, so a run killed
    while saving never leaves a truncated checkpoint behind; a temporary file orphaned by a kill is removed when the run folder is next used (``genflow.apps.run_folder.remove_stale_temps``)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        save_checkpoint(checkpoint, path)


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` (and at the end of training) draws a fixed-seed grid from the current
    (EMA, at validation time) weights: ``samples/step_XXXXXX.png`` in the run folder plus TensorBoard.
    ``precision`` is the network's arithmetic while sampling (``fp32`` or ``bf16``, see ``generate``). With a
    ``guide`` network (set by ``genflow.apps.train`` from ``sample.guide_ckpt``) the grid is autoguided by it with
    weight ``guidance``."""

    def __init__(self, dirpath: str, every_n_steps: int = 0, num: int = 64, steps: int = 18,
                 solver: str = "heun", guidance: float | None = None, precision: str = "fp32"):
        from genflow.sampling import check_precision

        self.dirpath, self.every_n_steps, self.num = Path(dirpath), every_n_steps, num
        self.steps, self.solver, self.guidance = steps, solver, guidance
        self.precision = check_precision(precision)
        self.guide = None
        self._last_step = -1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or not self.every_n_steps or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self.write(trainer, pl_module, self.dirpath / f"step_{step:06d}.png")

    def write(self, trainer, pl_module, path: Path) -> Path:
        from genflow.methods.base import autoguided
        from genflow.sampling import generate, save_grid, sample_conditions

        dm = trainer.datamodule
        seeds = list(range(self.num))
        cond = sample_conditions(dm, seeds, pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        net, guidance = pl_module.net, self.guidance
        if self.guide is not None:  # autoguidance replaces classifier-free guidance
            net, guidance = autoguided(net, self.guide.to(pl_module.device), guidance), None
        images = generate(pl_module.method, net, seeds, dm.data_shape, steps=self.steps, solver=self.solver,
                          cond=cond, guidance=guidance, device=pl_module.device, precision=self.precision,
                          num_classes=dm.num_classes)
        pl_module.train(was_training)
        if trainer.is_global_zero:  # under its name only once complete (a stop never leaves half a picture)
            atomic_write(path, lambda tmp: save_grid(images, tmp), suffix=f".tmp{Path(path).suffix}")
            logger = trainer.logger
            if logger is not None and hasattr(getattr(logger, "experiment", None), "add_image") and images.ndim == 4:
                import torchvision

                grid = torchvision.utils.make_grid(images[:64].float().cpu(), nrow=8, normalize=True,
                                                   value_range=(-1, 1))
                logger.experiment.add_image("samples", grid, trainer.global_step)
        return path
