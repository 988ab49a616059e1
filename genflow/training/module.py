"""GenerativeModule: a network plus a Method, trained by Lightning.

Nothing here branches on the method: a method plugs in through ``Method.loss`` and ``Method.sample``.
The optimiser follows EDM (Adam, linear learning-rate warm-up, gradients sanitised with
``nan_to_num``); a non-finite loss stops training with a clear error. The torch RNG state is stored in
checkpoints so a resumed run draws the same noise as an uninterrupted one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from genflow.errors import TrainingDiverged
from genflow.methods.base import Method


class GenerativeModule(pl.LightningModule):
    def __init__(self, net: nn.Module, method: Method, *, config: dict | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup_steps: int = 0, nonfinite_check_every: int = 50):
        super().__init__()
        self.net, self.method = net, method
        # the resolved run configuration, as plain containers so checkpoints load with weights_only=True
        self.save_hyperparameters({"config": config or {}}, logger=False)
        # the optimizer as a partial (configs/train.yaml optim: _target_ + _partial_); Adam(lr, ...) by default
        self.optimizer = optimizer or functools.partial(torch.optim.Adam, lr=lr, betas=tuple(betas), eps=eps,
                                                        weight_decay=weight_decay)
        self.warmup_steps = warmup_steps
        self.nonfinite_check_every = nonfinite_check_every
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

    # --- training ---------------------------------------------------------------------------
    def forward(self, x: Tensor, noise_label: Tensor, cond=None) -> Tensor:
        return self.net(x, noise_label, cond)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, cond = batch
        loss = self.method.loss(self.net, x, cond or None).mean()
        self._nonfinite |= ~torch.isfinite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # one host sync every `nonfinite_check_every` steps, not one per step
        if (self.global_step % self.nonfinite_check_every == 0) and bool(self._nonfinite):
            raise TrainingDiverged(
                f"the training loss became NaN or infinite (detected by step {self.global_step})\n"
                "  why: the learning rate is too high for this network/batch, or fp16 overflowed\n"
                "  fix: lower optim.lr, raise optim.warmup_steps, set trainer.gradient_clip_val=1.0, "
                "or use trainer.precision=bf16-mixed instead of 16-mixed")

    def on_before_optimizer_step(self, optimizer) -> None:
        # EDM's gradient sanitisation: a rare inf/nan gradient element must not poison the weights
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, cond = batch
        # fixed noise per validation batch so the held-out loss is comparable across evaluations,
        # and the global RNG is left untouched so resumed runs stay exact
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(10_000 + batch_idx)
            loss = self.method.loss(self.net, x, cond or None).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.optimizer(params)
        warmup = max(int(self.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min((step + 1) / warmup, 1.0) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- exact resume -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        checkpoint["rng_state"] = rng

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng_state")
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], self.device if self.device.type == "cuda" else None)

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, seeds, shape, **kwargs) -> Tensor:
        from genflow.sampling import generate

        return generate(self.method, self.net, seeds, shape, device=self.device, **kwargs)
