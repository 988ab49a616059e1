"""The Method protocol: what every generative method (EDM, PFGM++, SPD, flow matching, ...) offers.

A Method knows tensors and a ``net`` callable, never Lightning, loaders or files. Schedule tables
and spectra are registered as buffers so they move with ``.to()`` and live in checkpoints.

The network contract shared by every backbone: ``net(x, noise_label, cond)`` with x of the data
shape (B, ...), ``noise_label`` of shape (B,) (whatever scalar the method feeds: EDM's ln(sigma)/4,
flow time t, ...) and ``cond`` an optional dict ({"class": one-hot (B, K), "camera": ..., ...})
passed through untouched. Its output has x's shape. The *null condition* used by classifier-free
guidance is the same dict with every tensor zeroed (``null_cond``), the convention of EDM and of
Isotropic3D's zero image embedding.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from genflow.errors import config_error

Cond = Mapping[str, Tensor] | None
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], *, generator: Generators = None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise drawn on ``device``.

    ``generator`` may be one ``torch.Generator`` or one per sample (a sequence of length shape[0]);
    per-sample generators make image i identical whatever the batch it is drawn in.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def null_cond(cond: Cond) -> Cond:
    """The unconditional branch for classifier-free guidance: every conditioning tensor zeroed.

    Geometry inputs are not conditions to guide on: a reference view (keys starting with
    "reference") and the cameras are left out here and kept unchanged in both branches by ``guided``,
    as in MVDream/Isotropic3D's released sampler.
    """
    if cond is None:
        return None
    return {k: torch.zeros_like(v) for k, v in cond.items() if not k.startswith(KEPT_IN_UNCOND)}


#: conditioning keys that are inputs rather than guidance targets (kept in the unconditional branch)
KEPT_IN_UNCOND = ("reference", "camera")
#: conditioning entries that are clean data frames shown beside the noisy input (Isotropic3D's reference
#: view); ``Method.net_cond`` feeds them as the running method feeds clean data
CLEAN_FRAMES = ("reference",)


def guided(net: Callable, guidance: float | None) -> Callable:
    """Wrap ``net`` for classifier-free guidance: out = uncond + w * (cond - uncond).

    w = 1 (or None) is the plain conditional model. Every method's velocity is affine in the net
    output, so mixing net outputs equals mixing denoisers/velocities. Both branches run in one batch.
    """
    if guidance is None or guidance == 1.0:
        return net

    def guided_net(x: Tensor, noise_label: Tensor, cond: Cond = None) -> Tensor:
        if not cond:
            raise ValueError("guidance needs a conditional model and a condition (cond is empty)")
        uncond = null_cond(cond)
        both = {k: torch.cat([v, uncond.get(k, v)]) for k, v in cond.items()}
        out = net(torch.cat([x, x]), torch.cat([noise_label, noise_label]), both)
        out_c, out_u = out.chunk(2)
        return out_u + guidance * (out_c - out_u)

    return guided_net


class Method(nn.Module, ABC):
    """Base class of all generative methods; see the module docstring for the net contract.

    Times: EDM/PFGM++ use sigma (decreasing to 0), flow matching t in [0, 1] (noise -> data),
    SPD s in [1, 0]. Solvers integrate ``velocity`` along whatever ``time_grid`` returns.
    """

    #: human-readable time variable name (for plots and docs)
    time_name: str = "t"

    @abstractmethod
    def loss(self, net: Callable, x: Tensor, cond: Cond = None) -> Tensor:
        """Per-sample training loss, shape (B,), already weighted (summed over data dimensions)."""
        ...

    @abstractmethod
    def prior_sample(self, shape: Sequence[int], *, generator: Generators = None, device=None) -> Tensor:
        """Draw from the prior at the noise end of the time grid."""
        ...

    @abstractmethod
    def prior_log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the prior, shape (B,), for likelihoods."""
        ...

    @abstractmethod
    def time_grid(self, steps: int, device=None) -> Tensor:
        """float64 grid of ``steps + 1`` times from the prior end to the data end."""
        ...

    @abstractmethod
    def velocity(self, net: Callable, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """ODE drift dx/dt in this method's time; t is a scalar tensor or shape (B,)."""
        ...

    def sample(self, net: Callable, noise: Tensor, *, steps: int, solver: str = "heun", cond: Cond = None,
               guidance: float | None = None, generator: Generators = None, callback=None) -> Tensor:
        """Integrate the probability-flow ODE from ``noise`` (a prior draw) to data."""
        from genflow import solvers

        net = guided(net, guidance)
        grid = self.time_grid(steps, device=noise.device)
        return solvers.integrate(lambda x, t: self.velocity(net, x, t, cond), noise, grid, solver=solver,
                                 callback=callback, **self.solver_options(solver))

    def clean_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """How the net sees clean data x (B, ...): (net input, noise label (B,)) at the data end of this
        method's path. Conditioning frames (``CLEAN_FRAMES``) are fed this way, so a reference view looks
        to the net like a target that has reached the end of sampling."""
        raise config_error(f"{type(self).__name__} has no clean view",
                           "it has no noise label at the data end to show a clean conditioning frame with",
                           "use a diffusion or flow method (edm, pfgmpp, ddpm, spd, flow) with reference views")

    def net_cond(self, cond: Cond) -> Cond:
        """``cond`` as the net receives it: every clean frame (``CLEAN_FRAMES``) replaced by its clean view,
        with its noise label added as ``<key>_noise_label`` (B,)."""
        if not cond or not any(k in cond for k in CLEAN_FRAMES):
            return cond
        out = dict(cond)
        for key in CLEAN_FRAMES:
            if key in cond:
                out[key], out[f"{key}_noise_label"] = self.clean_view(cond[key])
        return out

    def solver_options(self, solver: str) -> dict:
        """Per-method solver options (e.g. EDM's Heun skips the correction on the step to sigma = 0)."""
        return {}

    def nfe(self, steps: int, solver: str = "heun") -> int:
        """Network evaluations of ``sample`` with this many steps (dopri5: measured, not predicted)."""
        from genflow import solvers

        return solvers.nfe(solver, steps, **self.solver_options(solver))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams().items())

    def hparams(self) -> dict:
        return {}
