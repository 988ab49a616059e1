"""Post-hoc EMA: power-function averages of the weights, their snapshots, and any width after training.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, CVPR 2024),
Section 3 and Appendix C.

* **Power-function EMA** (EDM2 eq. 2): after step t the average is θ̂_t = β_t θ̂_{t-1} + (1 - β_t) θ_t with
  β_t = (1 - 1/t)^(γ+1). Unrolled, step τ ≤ t carries the weight (τ^(γ+1) - (τ-1)^(γ+1)) / t^(γ+1): the
  integral over [τ-1, τ] of the profile p_t(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]. The average therefore never
  forgets its start in absolute terms, only relatively, and its width scales with the length of training.
* **Relative width** σ_rel (EDM2 eq. 3): the standard deviation of p_t divided by t,
  σ_rel² = (γ+1) / ((γ+2)² (γ+3)). Solving for γ gives the cubic
  γ³ + 7γ² + (16 - σ_rel⁻²)γ + (12 - σ_rel⁻²) = 0, whose largest real root is the exponent (``gamma_of``;
  σ_rel < 1/√12 keeps γ > 0).
* **Reconstruction** (EDM2 Appendix C.2): snapshots of EMAs with exponents γ_i taken at steps t_i are
  combined as Σ_i x_i θ̂_i, with x the least-squares fit of the target profile p_{t,γ} by the snapshot
  profiles in L²[0, ∞): the normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>, and the
  inner product of two power-function profiles in closed form (``profile_dot``). The weights are rescaled to
  sum to one (an average of weights, never a scaled one). ``Reconstruction.residual`` is the fit's relative
  L² error ‖Σ x_i p_i - p_target‖ / ‖p_target‖.

Why not ema-pytorch's ``PostHocEMA`` (see docs/DESIGN.md): its update reads the step counter on the host
(``.item()``) twice per EMA per step and lerps tensor by tensor; its snapshots are written with a plain
``torch.save`` (a kill mid-write leaves a truncated file that the reconstruction later globs), are named by
the EMA's *index* and carry no exponent, so the reconstruction takes γ from whatever list the object was
built with; and it keeps its own step counter beside Lightning's. ``PowerEma`` below runs on Lightning's
weight averaging, as ``EDMEma`` does: the averages live in Lightning checkpoints and resume bit-exactly, and
every snapshot is a self-describing, atomically written file.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel

from genflow.errors import config_error
from genflow.training.callbacks import lerp_average

#: the widest σ_rel with γ > 0 (γ = 0 is the uniform average of the whole run: σ_rel = 1/√12)
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)
SNAPSHOT_DIR = "posthoc"
SNAPSHOT_RE = re.compile(r"^snapshot_(\d{9})\.pt$")


# --- σ_rel <-> γ --------------------------------------------------------------------------------------
def sigma_rel_of(gamma: float) -> float:
    """σ_rel of the power-function profile with exponent γ (EDM2 eq. 3)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def check_sigma_rel(sigma_rel, key: str = "sigma_rel") -> float:
    value = float(sigma_rel)
    if not 0.0 < value < SIGMA_REL_MAX:
        raise config_error(f"{key}={sigma_rel}", f"σ_rel is the EMA's width relative to the training length; a "
                           f"power-function EMA has 0 < σ_rel < 1/√12 = {SIGMA_REL_MAX:.4f} (γ > 0)",
                           f"use values such as {key}=0.05 (EDM2 trains with 0.05 and 0.10)")
    return value


def gamma_of(sigma_rel: float) -> float:
    """The exponent γ of the power-function EMA of relative width σ_rel: the largest real root of
    (γ+2)²(γ+3) - σ_rel⁻²(γ+1) = γ³ + 7γ² + (16 - σ_rel⁻²)γ + (12 - σ_rel⁻²)."""
    inv = check_sigma_rel(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(step: int, gamma: float) -> float:
    """β_t = (1 - 1/t)^(γ+1) for the update after step t (1-based): 0 at t = 1 (the average starts as a copy)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


# --- profiles and their least-squares combination ---------------------------------------------------
def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> = ∫ p_a p_b dτ of power-function profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]:
    (γ_a+1)(γ_b+1) m^(γ_a+γ_b+1) / ((γ_a+γ_b+1) t_a^(γ_a+1) t_b^(γ_b+1)) with m = min(t_a, t_b); broadcasts."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    log = (g_a + g_b + 1) * np.log(m) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * np.exp(log)


@dataclass
class Reconstruction:
    """Weights x (one per snapshot EMA) whose combination approximates the target EMA, and the fit's error."""

    weights: np.ndarray      # (n,), sums to one
    residual: float          # ‖Σ x_i p_i - p_target‖ / ‖p_target‖ in L²


def solve_weights(steps: Sequence[float], gammas: Sequence[float], step: float, gamma: float) -> Reconstruction:
    """Least-squares weights of snapshot profiles (``steps[i]``, ``gammas[i]``) for the target (``step``, ``gamma``)."""
    t, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = profile_dot(t, g, step, gamma)
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    x = x / x.sum()
    target = float(profile_dot(step, gamma, step, gamma))
    err2 = target - 2.0 * float(x @ rhs) + float(x @ gram @ x)
    return Reconstruction(weights=x, residual=math.sqrt(max(err2, 0.0) / target))


# --- snapshots on disk -----------------------------------------------------------------------------
def snapshot_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"snapshot_{step:09d}.pt"


def list_snapshots(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot in ``folder``, by step."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := SNAPSHOT_RE.match(p.name))] \
        if folder.is_dir() else []
    return sorted(found)


def read_snapshot(path: Path, *, mmap: bool = True) -> dict:
    """A snapshot written by ``PowerEma``, checked: weights only, with its step, σ_rel and state dicts."""
    from genflow.cache import checkpoint_damage
    from genflow.errors import checkpoint_error

    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise checkpoint_error(f"cannot read post-hoc EMA snapshot {path} ({type(err).__name__})",
                               "the file is empty, truncated or not a snapshot written by train.py with ema=posthoc",
                               "remove it (the other snapshots still reconstruct, with a coarser fit)") from err
    if why := checkpoint_damage(snap, path):  # the tensors' sha256 and the CRC-32 of step, σ_rel and config
        raise checkpoint_error(f"post-hoc EMA snapshot {path} is corrupt", why,
                               "remove it (the other snapshots still reconstruct, with a coarser fit)")
    keys = ("step", "sigma_rel", "state_dicts", "hyper_parameters")
    if not isinstance(snap, dict) or any(k not in snap for k in keys) or \
            len(snap["sigma_rel"]) != len(snap["state_dicts"]):
        raise checkpoint_error(f"{path} is not a post-hoc EMA snapshot", f"it lacks one of {', '.join(keys)}",
                               "keep only files written by train.py with ema=posthoc in the snapshot folder")
    return snap


def reconstruct(snapshots: Sequence[dict], sigma_rel: float, step: int | None = None
                ) -> tuple[dict[str, torch.Tensor], Reconstruction]:
    """The state dict of the EMA of width ``sigma_rel`` at ``step`` (default: the last snapshot's step) from
    ``snapshots`` (``read_snapshot`` dicts; those after ``step`` are not used). Floating-point tensors are
    combined in float64 and stored in their own dtype; other tensors (counters) come from the last snapshot."""
    used = [s for s in snapshots if step is None or int(s["step"]) <= step]
    step = int(used[-1]["step"]) if step is None else int(step)
    pairs = [(s, i) for s in used for i in range(len(s["sigma_rel"]))]
    fit = solve_weights([int(s["step"]) for s, _ in pairs], [gamma_of(s["sigma_rel"][i]) for s, i in pairs],
                        step, gamma_of(sigma_rel))
    last = used[-1]["state_dicts"][0]
    out: dict[str, torch.Tensor] = {}
    for name, ref in last.items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for (snap, i), w in zip(pairs, fit.weights):
            acc.add_(snap["state_dicts"][i][name].double(), alpha=float(w))
        out[name] = acc.to(ref.dtype)
    return out, fit


# --- the training callback -------------------------------------------------------------------------
class PowerEma(WeightAveraging):
    """Power-function EMAs of the weights at the widths ``sigma_rel`` and their periodic snapshots.

    The first width's average is Lightning's averaged model: it is what validation, the sample grids, the FID
    callback and ``final.ckpt`` see, as with ``EDMEma``. The others are averaged models of this callback,
    stored in every Lightning checkpoint (``posthoc_ema``) so a resumed run continues them exactly. Every
    ``snapshot_kimg`` thousand images, and at the last step, all averages are written (atomically, weights
    only, with the run's config) to ``<dirpath>/snapshot_<step>.pt``; ``python -m genflow.apps.posthoc``
    reconstructs any other width from them.
    """

    def __init__(self, sigma_rel: Sequence[float] = (0.05, 0.10), snapshot_kimg: float = 64.0,
                 dirpath: str = SNAPSHOT_DIR, batch_size: int | None = None):
        if isinstance(sigma_rel, (int, float)):
            sigma_rel = [sigma_rel]
        self.sigma_rel = [check_sigma_rel(s, "ema.sigma_rel") for s in sigma_rel]
        if not self.sigma_rel or len(set(self.sigma_rel)) != len(self.sigma_rel):
            raise config_error(f"ema.sigma_rel={list(sigma_rel)}", "post-hoc EMA tracks one or more distinct widths",
                               "use e.g. ema.sigma_rel=[0.05,0.10]")
        if not snapshot_kimg > 0:
            raise config_error(f"ema.snapshot_kimg={snapshot_kimg}", "snapshots are taken every that many thousand "
                               "training images", "use a positive value, e.g. ema.snapshot_kimg=64")
        self.gammas = [gamma_of(s) for s in self.sigma_rel]
        self.snapshot_kimg, self.dirpath, self.batch_size = float(snapshot_kimg), Path(dirpath), batch_size
        self._betas = [0.0] * len(self.gammas)
        self._extra: list[AveragedModel] = []
        self._every: int | None = None
        super().__init__(use_buffers=True, multi_avg_fn=partial(self._lerp, 0))

    def _lerp(self, index: int, averaged: list, current: list, num_averaged) -> None:
        lerp_average(averaged, current, 1.0 - self._betas[index])

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            device = self._device or pl_module.device
            self._extra = [AveragedModel(pl_module, device=device, use_buffers=True,
                                         multi_avg_fn=partial(self._lerp, i)) for i in range(1, len(self.gammas))]

    def _images_per_step(self, trainer) -> int:
        batch = self.batch_size or trainer.datamodule.batch_size
        return int(batch) * trainer.world_size * trainer.accumulate_grad_batches

    def on_train_start(self, trainer, pl_module) -> None:
        per_step = self._images_per_step(trainer)
        self._every = max(1, round(self.snapshot_kimg * 1000 / per_step))
        if trainer.is_global_zero:
            self._announce(trainer, pl_module, per_step)

    def _announce(self, trainer, pl_module, per_step: int) -> None:
        from genflow.progress import say

        state = self._average_model.module.state_dict()
        size = len(self.gammas) * sum(v.numel() * v.element_size() for v in state.values())
        total_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        count = (total_steps // self._every + (total_steps % self._every > 0)) if total_steps else None
        widths = ", ".join(f"{s:g} (γ={g:.2f})" for s, g in zip(self.sigma_rel, self.gammas))
        line = (f"post-hoc EMA: σ_rel {widths}; a snapshot every {self._every} steps ({self._every * per_step} "
                f"images) into {self.dirpath}: {size / 2**20:.2f} MiB each")
        if count:
            line += f", {count} by step {total_steps} = {count * size / 2**20:.1f} MiB"
        say(line, Path(trainer.default_root_dir) / "train.log")

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        if step_idx is None:
            return False
        self._betas = [power_beta(step_idx + 1, g) for g in self.gammas]
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        before = self._latest_update_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._latest_update_step == before:  # no optimizer step (gradient accumulation)
            return
        for average in self._extra:
            average.update_parameters(pl_module)
        step = trainer.global_step
        last = 0 < trainer.max_steps <= step
        if step % self._every == 0 or last:
            self.write_snapshot(trainer, pl_module, step)

    def averages(self) -> list[AveragedModel]:
        return [self._average_model, *self._extra]

    def write_snapshot(self, trainer, pl_module, step: int) -> Path | None:
        from genflow.cache import save_checkpoint

        if not trainer.is_global_zero:
            return None
        snap = {"step": int(step), "sigma_rel": list(self.sigma_rel),
                "images": int(step) * self._images_per_step(trainer),
                "state_dicts": [{k: v.detach().cpu().clone() for k, v in avg.module.state_dict().items()}
                                for avg in self.averages()],
                # the run's config and data record (genflow.data.record), as in its checkpoints
                "hyper_parameters": dict(pl_module.hparams)}
        folder = self.dirpath
        folder.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(snap, snapshot_path(folder, step))

    # exact resume: the other averages travel in the Lightning checkpoint beside the first (state_dict)
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:
            checkpoint["posthoc_ema"] = {"sigma_rel": list(self.sigma_rel),
                                         "averages": [avg.state_dict() for avg in self._extra]}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is None:
            return
        stored = checkpoint.get("posthoc_ema")
        if stored is None or "current_model_state" not in checkpoint:
            raise config_error("resuming with ema=posthoc from a checkpoint of a run without it",
                               "the power-function averages start with the run; they cannot be recovered later",
                               "resume with the run's own ema setting, or start a new run with ema=posthoc")
        if [float(s) for s in stored["sigma_rel"]] != self.sigma_rel:
            raise config_error(f"ema.sigma_rel={self.sigma_rel} but the run tracks {stored['sigma_rel']}",
                               "a resumed run continues the averages it started", 
                               f"resume with ema.sigma_rel=[{','.join(map(str, stored['sigma_rel']))}]")
        for average, state in zip(self._extra, stored["averages"]):
            average.load_state_dict(state)


# --- a run's snapshots -> checkpoints ----------------------------------------------------------------
def run_snapshots(run_dir: Path, *, key: str = "run") -> list[dict]:
    """Every snapshot of the run in ``run_dir`` (read lazily, memory-mapped), by step; they must all come from
    the same training config."""
    from genflow.errors import checkpoint_error

    run_dir = Path(run_dir)
    folder = run_dir / SNAPSHOT_DIR
    found = list_snapshots(folder)
    if not found:
        raise config_error(f"{key}={run_dir} holds no post-hoc EMA snapshots ({folder}/snapshot_*.pt)",
                           "widths are reconstructed from the snapshots that a run trained with ema=posthoc writes",
                           "pass the folder of a run trained with ema=posthoc (train.py ema=posthoc ...)")
    snaps = [read_snapshot(path) for _, path in found]
    # what makes the averages those of one model (a resumed run may change max_steps, loaders, ...)
    same = lambda snap: {k: snap["hyper_parameters"]["config"].get(k) for k in ("model", "net", "ema")}  # noqa: E731
    for (_, path), snap in zip(found, snaps):
        if same(snap) != same(snaps[-1]):
            raise checkpoint_error(f"{path} was written by a run of another model, net or EMA than "
                                   f"{found[-1][1].name}",
                                   "a reconstruction combines the averages of one run only",
                                   f"move the snapshots of other runs out of {folder}")
    return snaps


def check_step(snaps: Sequence[dict], step: int | None, key: str = "step") -> int:
    first, last = int(snaps[0]["step"]), int(snaps[-1]["step"])
    if step is None:
        return last
    if not first <= int(step) <= last:
        raise config_error(f"{key}={step}", f"the run's snapshots cover steps {first}..{last}; an average at a "
                           "step outside them cannot be reconstructed", f"use {key} between {first} and {last}, or "
                           "drop it (the last snapshot's step)")
    return int(step)


def posthoc_checkpoint(snaps: Sequence[dict], sigma_rel: float, step: int | None = None) -> dict:
    """A weights-only checkpoint (the layout of ``final.ckpt``: state_dict, the run's config and data record)
    holding the EMA of width ``sigma_rel`` at ``step`` reconstructed from the snapshots, with what the fit
    achieved."""
    step = check_step(snaps, step)
    state, fit = reconstruct(snaps, check_sigma_rel(sigma_rel), step)
    used = sum(len(s["sigma_rel"]) for s in snaps if int(s["step"]) <= step)
    return {"state_dict": state, "global_step": step,
            "hyper_parameters": dict(snaps[-1]["hyper_parameters"]),
            "posthoc": {"sigma_rel": float(sigma_rel), "gamma": gamma_of(sigma_rel), "step": step,
                        "residual": fit.residual, "averages_used": used}}
