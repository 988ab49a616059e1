"""GenerativeModule: a network plus a Method, trained by Lightning.

Nothing here branches on the method: a method plugs in through ``Method.loss`` and ``Method.sample``.
The optimiser follows EDM (Adam, linear learning-rate warm-up, gradients sanitised with
``nan_to_num``). The torch RNG state is stored in checkpoints so a resumed run draws the same noise as an
uninterrupted one.

Divergence: every step ORs "this loss was not finite" into an on-device flag (no host sync); the flag and
the weights are checked before every checkpoint write and at the end of training, so a diverged run stops
with ``TrainingDiverged`` and never writes a checkpoint from non-finite weights.

Speed without changing the maths: fused Adam on CUDA (foreach where Lightning clips gradients or scales the
loss), the gradient sanitisation as a handful of multi-tensor kernels, the training loss sent to the progress
bar only every ``log_every_n_steps`` (a per-step ``.item()`` would stall the GPU), and an optional compiled
copy of the network's forward used by the training step only (``compile``): the module's state dict, the EMA
copy and checkpoints never see it.
"""
from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from genflow.errors import TrainingDiverged
from genflow.methods.base import Method


class GenerativeModule(pl.LightningModule):
    def __init__(self, net: nn.Module, method: Method, *, config: dict | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 warmup_steps: int = 0, data_record: dict | None = None):
        super().__init__()
        from genflow.data.record import checkpoint_hparams

        self.net, self.method = net, method
        # the resolved run configuration and what sampling needs of the data (genflow.data.record), as plain
        # containers so checkpoints load with weights_only=True
        self.save_hyperparameters(checkpoint_hparams(config or {}, data_record), logger=False)
        # the optimizer as a partial (configs/train.yaml optim: _target_ + _partial_); Adam(lr, ...) by default
        self.optimizer = optimizer or functools.partial(torch.optim.Adam, lr=lr, betas=tuple(betas), eps=eps,
                                                        weight_decay=weight_decay)
        self.warmup_steps = warmup_steps
        # False, True (torch.compile's default backend) or a backend name, e.g. "aot_eager" (speed_settings)
        self.compile_net: bool | str = False
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        self._compiled_forward = None

    # --- training ---------------------------------------------------------------------------
    def forward(self, x: Tensor, noise_label: Tensor, cond=None) -> Tensor:
        return self.net(x, noise_label, cond)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, cond = batch
        loss = self.method.loss(self._training_net(), x, cond or None).mean()
        self._nonfinite |= ~torch.isfinite(loss.detach())
        # loggers read this tensor every log_every_n_steps only; the progress bar would read it every step
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=x.shape[0])
        trainer = self._trainer
        if trainer is not None and trainer.progress_bar_callback is not None and \
                self.global_step % max(int(trainer.log_every_n_steps), 1) == 0:
            # a CPU copy (one sync per log interval): the bar shows it without reading the GPU each step
            self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False, on_step=True,
                     on_epoch=False, batch_size=x.shape[0])
        return loss

    def _training_net(self):
        """The network for the training step: a compiled view of ``self.net`` when ``compile`` is set.

        The compiled wrapper lives outside the module's registered children (so state-dict keys carry no
        ``_orig_mod``, and the EMA copy made in ``setup`` does not share it) and runs ``self.net``'s own
        parameters, so checkpoints, EMA and exact resume are those of the uncompiled run.
        """
        if not self.compile_net:
            return self.net
        if self._compiled_forward is None:
            backend = self.compile_net if isinstance(self.compile_net, str) else "inductor"
            self.__dict__["_compiled_forward"] = torch.compile(self.net, backend=backend)
        return self._compiled_forward

    def diverged(self) -> bool:
        """Whether any training loss so far was non-finite or a weight is (one host sync; all ranks agree)."""
        params = [p.detach() for p in self.parameters() if p.is_floating_point()]
        bad = self._nonfinite.clone()
        if params:
            bad |= ~torch.isfinite(torch.stack(torch._foreach_norm(params))).all()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(bool(bad), all=False))
        return bool(bad)

    def _raise_diverged(self, when: str) -> None:
        raise TrainingDiverged(
            f"training diverged: the loss or the weights became NaN or infinite (found {when}, step "
            f"{self.global_step}); no checkpoint was written from these weights\n"
            "  why: the learning rate is too high for this network/batch, or fp16 overflowed\n"
            "  fix: lower optim.lr, raise optim.warmup_steps, set trainer.gradient_clip_val=1.0, use "
            "trainer.precision=bf16-mixed instead of 16-mixed, and resume from the last good checkpoint "
            "(ckpt_path=<run>/checkpoints/step_....ckpt) or start again")

    # --- throughput: timed like genflow.apps.bench train-step (after warm-up steps, synchronised at both ends) ---
    def on_train_start(self) -> None:
        first, last = self.global_step, self._trainer.max_steps
        warmup = min(5, max((last - first) // 4, 0)) if last and last > 0 else 5
        self._timing = {"from_step": first + warmup, "start": None, "end": None}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        timing = getattr(self, "_timing", None)
        if timing and timing["start"] is None and self.global_step >= timing["from_step"]:
            self._synchronize()
            timing["start"] = (self.global_step, time.perf_counter())

    def timed_steps(self) -> tuple[int, float] | None:
        """(optimizer steps, seconds) of the training loop after its warm-up steps, or None if too short."""
        timing = getattr(self, "_timing", None)
        if not timing or timing["start"] is None or timing["end"] is None:
            return None
        steps = timing["end"][0] - timing["start"][0]
        return (steps, timing["end"][1] - timing["start"][1]) if steps > 0 else None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_end(self) -> None:
        timing = getattr(self, "_timing", None)
        if timing and timing["start"] is not None:
            self._synchronize()
            timing["end"] = (self.global_step, time.perf_counter())
        # a short run that never reached a checkpoint fails like a long one
        if self.diverged():
            self._raise_diverged("at the end of training")

    def on_before_optimizer_step(self, optimizer) -> None:
        # EDM's gradient sanitisation (nan -> 0, +-inf -> +-1e5): a rare bad element must not poison the
        # weights. One concatenation, one nan_to_num and one multi-tensor copy per dtype/device instead of
        # one kernel per parameter.
        sanitize_gradients([p.grad for p in self.parameters() if p.grad is not None])

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
        fast = multi_tensor_options(params, self._trainer)
        accepted = inspect.signature(getattr(self.optimizer, "func", self.optimizer)).parameters
        chosen = getattr(self.optimizer, "keywords", {})
        opt = self.optimizer(params, **{k: v for k, v in fast.items() if k in accepted and k not in chosen})
        warmup = max(int(self.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min((step + 1) / warmup, 1.0) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- exact resume -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # read the on-device divergence flag before anything reaches the disk
        if self.diverged():
            self._raise_diverged("before writing a checkpoint")
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


def speed_settings(module: GenerativeModule, *, matmul_precision: str = "highest", compile: bool | str = False,
                   channels_last: bool = False) -> None:
    """The GPU levers that keep the maths (train.py's ``trainer.matmul_precision|compile|channels_last`` and
    ``genflow.apps.bench train-step``): fp32 matmul precision (``highest`` = TF32 off, EDM's protocol), the compiled
    training forward, NHWC activations and weights for networks that offer them."""
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cudnn.allow_tf32 = matmul_precision != "highest"
    module.compile_net = compile
    if channels_last and hasattr(module.net, "channels_last"):
        module.net.channels_last = True
        module.net.to(memory_format=torch.channels_last)


#: devices whose optimizer step runs fused (one kernel for the whole update, the same maths as the loop)
FUSED_DEVICES = ("cuda",)


def multi_tensor_options(params: list[Tensor], trainer=None) -> dict:
    """``fused=True`` on CUDA, else ``foreach=True`` (used where the optimizer accepts it and the config did
    not choose). Not fused when Lightning must clip gradients or a loss scaler runs (``16-mixed``): a fused step
    unscales inside the optimizer, where Lightning refuses to clip, and the scaler would check the gradients
    for overflow only after the sanitisation had replaced the infinities."""
    if trainer is not None and (trainer.gradient_clip_val or getattr(trainer.precision_plugin, "scaler", None)):
        return {"foreach": True}
    fused = bool(params) and all(p.device.type in FUSED_DEVICES for p in params)
    return {"fused": True} if fused else {"foreach": True}


def sanitize_gradients(grads: list[Tensor]) -> None:
    """``nan_to_num_(g, nan=0, posinf=1e5, neginf=-1e5)`` on every gradient, grouped by (device, dtype)
    into three kernels per group whatever the number of tensors."""
    groups: dict[tuple, list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for group in groups.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        torch.nan_to_num_(flat, nan=0.0, posinf=1e5, neginf=-1e5)
        torch._foreach_copy_(group, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in group]), group)])


def check_finite_weights(weights: nn.Module | dict[str, Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run): sampling them would give blank images.

    One reduction over all floating-point tensors; raises CheckpointError naming the first bad tensor.
    """
    from genflow.errors import CheckpointError

    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()}
    if not tensors or torch.isfinite(torch.stack(torch._foreach_norm(list(tensors.values())))).all():
        return
    bad = next(k for k, v in tensors.items() if not torch.isfinite(v).all())
    raise CheckpointError(f"{source} holds non-finite weights (NaN or infinity, first in {bad!r})\n"
                          "  why: the run that wrote it diverged; samples from it would be blank images\n"
                          "  fix: use an earlier checkpoint of that run, or train again with a lower optim.lr")
