"""Shortest-path diffusion (SPD): Das, Fotiadis, Batra, Nabiei, Liao, Vakili, Shiu, Bernacchia,
"Image generation with shortest path diffusion", ICML 2023 (arXiv:2306.00501).

Data model: x_c ~ N(0, F^-1 diag(S) F) per channel, u = F x the orthonormal 2-D FFT, S_k = E|u_k|^2
the per-frequency second moment in training units ([-1, 1]). The Fisher-Rao geodesic from the data
to N(0, I) is Sigma(s) = F^-1 diag(S^(1-s)) F (log-variances move linearly; constant speed, length
L* = sqrt(1/2 sum_{c,k} ln^2 S_k)). Equation -> function:

- Spectrum: empirical table or radial power law S(k) = c1 / (c2 + |k|)^m, estimated and cached in
  ``genflow.methods.spectrum``                                         -> ``SPD.prepare``, ``SPD.from_data``
- Geodesic realised by a VP process: abar_k(s) S_k + 1 - abar_k(s) = S_k^(1-s), i.e.
  abar_k(s) = expm1(tau ln S_k) / expm1(ln S_k), tau = 1 - s (limit tau at S_k = 1)
                                                                       -> ``SPD.alpha_bar``
- 1 - abar_k(s) = S_k^tau expm1(s ln S_k) / expm1(ln S_k)               -> ``SPD.one_minus_alpha_bar``
- beta_k(s) = -d ln abar_k / ds = ln S_k S_k^tau / (S_k^tau - 1) (-> 1/(1-s) as s -> 1)
                                                                       -> ``SPD.rate``
- SNR_k = 1 at tau* = ln(2 S_k / (S_k + 1)) / ln S_k                    -> ``SPD.snr_crossing_time``
- Forward corruption in Fourier space, eps-prediction MSE in pixels, uniform time, the per-frequency
  ancestral sampler with fixed-large variance (T steps), the probability-flow ODE, the prior
  N(0, F^-1 diag(S^(1/T)) F) at s = 1 - 1/T: shared with DDPM in ``genflow.methods.vp.VPDiffusion``.

Numerics: every closed form is evaluated in float64 through expm1 of non-positive arguments, so
abar, 1 - abar and beta keep full relative precision for S_k -> 0, 1, infinity and s -> 0, 1 (the
reference computes (1 - S^tau)/(1 - S) in float32, which is off by up to 1.8% in the discrete beta
near S = 1 and returns abar = 0 at S = 1 + 1e-7). The network label is 1000 * s (the reference's
t * 1000 / T). Deliberate deviation: the prior is the geodesic's marginal N(0, S^(1/T)) at the grid's
first time instead of N(0, I) (they differ by < 0.25% in std for the reference fit at T = 4000), so
that ``prior_sample``, ``prior_log_prob`` and the ODE's start time agree.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from genflow.errors import config_error
from genflow.methods.spectrum import _negated, estimate_spectrum, power_law_spectrum
from genflow.methods.vp import VPDiffusion

SOURCES = ("empirical", "radial", "constants")


def _log1mexp(a: Tensor) -> Tensor:
    """ln(1 - e^(-a)) for a >= 0, accurate on both sides of a = ln 2 (Maechler's switch)."""
    return torch.where(a < math.log(2), torch.log(-torch.expm1(-a)), torch.log1p(-torch.exp(-a)))


# ------------------------------------------------------------------------------------- the method
class SPD(VPDiffusion):
    """Shortest-path diffusion on images (B, C, H, W) with a per-frequency spectrum S of shape (H, W)
    (shared by all channels) or (C, H, W). See the module docstring for the equations."""

    def __init__(self, spectrum: Tensor | str | None = None, T: int = 1000, *, source: str = "empirical",
                 c1: float = 1.59, c2: float = 0.0086, m: float = 2.0, floor: float = 1e-6, cache: bool = True,
                 label_scale: float = 1000.0, time_sampling: str = "continuous", ode_grid: str = "uniform",
                 rho: float = 7.0):
        super().__init__(T=T, label_scale=label_scale, time_sampling=time_sampling, ode_grid=ode_grid, rho=rho)
        if source not in SOURCES:
            raise config_error(f"source={source!r} is unknown", "SPD's spectrum comes from the data or constants",
                               f"use one of {', '.join(SOURCES)}")
        if source == "constants" and not (c1 > 0 and c2 > 0 and m > 0):
            raise config_error(f"(c1, c2, m)=({c1}, {c2}, {m}) are not all positive",
                               "S(k) = c1 / (c2 + |k|)^m must be a positive, decreasing spectrum",
                               "use the reference constants c1=1.59, c2=0.0086, m=2.0")
        self.source, self.c1, self.c2, self.m = source, float(c1), float(c2), float(m)
        self.floor, self.cache = float(floor), bool(cache)
        self.register_buffer("spectrum", torch.empty(0, dtype=torch.float64))
        self.register_buffer("log_spectrum", torch.empty(0, dtype=torch.float64), persistent=False)
        if isinstance(spectrum, (str, Path)):
            spectrum = self._read_spectrum(Path(spectrum))
        if spectrum is not None:
            self.set_spectrum(spectrum)

    @staticmethod
    def _read_spectrum(path: Path) -> Tensor:
        if not path.exists():
            raise config_error(f"spectrum file {path} does not exist", "SPD was told to read its spectrum from it",
                               "pass a .safetensors file with a 'spectrum' tensor, or leave spectrum unset to "
                               "estimate it from the training data")
        from safetensors.torch import load_file

        return load_file(str(path))["spectrum"]

    @classmethod
    def from_data(cls, images: Tensor, T: int = 1000, *, source: str = "empirical", floor: float = 1e-6,
                  cache: bool = True, **kwargs) -> "SPD":
        """SPD with the spectrum estimated from ``images`` (N, C, H, W) in training units."""
        S = estimate_spectrum(images, source, floor=floor, cache=cache)
        return cls(S, T=T, source=source, floor=floor, cache=cache, **kwargs)

    def prepare(self, datamodule) -> None:
        """Estimate (or build from c1, c2, m) the spectrum for ``datamodule`` unless one is set."""
        shape = tuple(datamodule.data_shape)
        if len(shape) != 3:
            raise config_error(f"SPD needs image data (C, H, W), got data_shape {shape}",
                               "its schedule is diagonal in the 2-D Fourier basis of images",
                               "use an image dataset (digits, cifar10, imagefolder) or model=ddpm for vectors")
        if not self.ready:
            if self.source == "constants":
                S = power_law_spectrum(self.c1, self.c2, self.m, *shape[-2:])
            else:
                S = estimate_spectrum(datamodule.train_tensor(), self.source, floor=self.floor, cache=self.cache)
            self.set_spectrum(S)
        self._check_data(torch.empty((1, *shape), device="meta"))

    # ------------------------------------------------------------------------------- spectrum state
    @property
    def ready(self) -> bool:
        return self.spectrum.numel() > 0

    @property
    def coef_shape(self) -> tuple[int, ...]:
        return tuple(self.spectrum.shape)

    def set_spectrum(self, S) -> None:
        """Validate, symmetrise (S(k) = S(-k) exactly, so F^-1 of every filter is real) and install S."""
        S = torch.as_tensor(S).detach().to(device=self.spectrum.device, dtype=torch.float64)
        if S.ndim not in (2, 3) or S.shape[-1] < 2 or S.shape[-2] < 2:
            raise config_error(f"spectrum of shape {tuple(S.shape)} is not (H, W) or (C, H, W)",
                               "SPD has one variance per (channel and) 2-D frequency of the images",
                               "pass the per-frequency variance of the orthonormal fft2 of the training images")
        if not bool(torch.isfinite(S).all()) or not bool((S > 0).all()):
            raise config_error("the spectrum has zero, negative or non-finite entries",
                               "each S_k is a variance and the schedule uses ln S_k",
                               "floor it, e.g. spectrum.clamp_min(1e-6), or estimate it with SPD.from_data")
        S_neg = _negated(S)
        asym = float(((S - S_neg).abs() / (S + S_neg)).max())
        if asym > 1e-4:
            raise config_error(f"the spectrum is not even in k (relative asymmetry {asym:.2e})",
                               "the power spectrum of real images satisfies S(k) = S(-k); otherwise the filtered "
                               "images would not be real",
                               "use a radial spectrum or symmetrise it: 0.5 * (S + S(-k))")
        S = 0.5 * (S + S_neg)
        self.spectrum = S
        self._set_derived()

    def _set_derived(self) -> None:
        self.log_spectrum = self.spectrum.log()
        self._build_tables()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "spectrum"
        if key in state_dict:  # size the buffer from the checkpoint: no data needed to restore SPD
            self.spectrum = torch.empty(state_dict[key].shape, dtype=torch.float64, device=self.spectrum.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.ready:
            self._set_derived()

    # ------------------------------------------------------------------------------- closed forms
    def _time(self, s) -> tuple[Tensor, Tensor]:
        if not self.ready:
            self._check_data(torch.empty(0))
        s = torch.as_tensor(s, dtype=torch.float64, device=self.spectrum.device)
        s = s.reshape(*s.shape, *([1] * self.spectrum.ndim))
        return s, 1 - s

    @staticmethod
    def _g(t: Tensor, Ln: Tensor) -> Tensor:
        """expm1(t Ln) / expm1(Ln) for Ln <= 0 (both factors in (-1, 0]); the limit t at Ln = 0."""
        zero = Ln == 0
        safe = torch.where(zero, -torch.ones_like(Ln), Ln)
        return torch.where(zero, t, torch.expm1(t * safe) / torch.expm1(safe))

    def alpha_bar(self, s) -> Tensor:
        """abar_k(s) = expm1(tau ln S_k) / expm1(ln S_k), float64, shape ``s.shape + spectrum.shape``.

        Written as exp(-s max(L, 0)) * g(tau, -|L|) so no intermediate overflows or cancels."""
        s, tau = self._time(s)
        L = self.log_spectrum
        return self._g(tau, -L.abs()) * torch.exp(-s * L.clamp_min(0))

    def log_alpha_bar(self, s) -> Tensor:
        """ln abar_k(s): log1p(-(1 - abar)) where abar > 1/2 (no cancellation near 1), otherwise
        ln(1 - e^(-tau |L|)) - ln(1 - e^(-|L|)) - s max(L, 0), finite even where abar underflows."""
        s_, tau = self._time(s)
        L = self.log_spectrum
        a = L.abs()
        safe = torch.where(a == 0, torch.ones_like(a), a)
        far = _log1mexp(tau * safe) - _log1mexp(safe) - s_ * L.clamp_min(0)
        far = torch.where(a == 0, tau.log(), far)
        near = torch.log1p(-self.one_minus_alpha_bar(s))
        return torch.where(self.alpha_bar(s) > 0.5, near, far)

    def one_minus_alpha_bar(self, s) -> Tensor:
        """1 - abar_k(s) = S_k^tau expm1(s ln S_k) / expm1(ln S_k), evaluated like ``alpha_bar``."""
        s, tau = self._time(s)
        L = self.log_spectrum
        return self._g(s, -L.abs()) * torch.exp(-tau * (-L).clamp_min(0))

    def rate(self, s) -> Tensor:
        """beta_k(s) = -d ln abar_k / ds = |L| S^(tau [L<0]) / (1 - exp(-tau |L|)); 1/tau at S_k = 1."""
        s, tau = self._time(s)
        L = self.log_spectrum
        a = L.abs()
        num = torch.where(a == 0, torch.ones_like(a), a) * torch.exp(-tau * (-L).clamp_min(0))
        den = torch.where(a == 0, tau.expand(num.shape), -torch.expm1(-tau * a))
        return num / den

    def marginal_variance(self, s) -> Tensor:
        """lambda_k(s) = abar S + 1 - abar (= S^(1-s) on the geodesic), from the implemented abar."""
        return self.alpha_bar(s) * self.spectrum + self.one_minus_alpha_bar(s)

    def snr(self, s) -> Tensor:
        """SNR_k(s) = abar_k S_k / (1 - abar_k)."""
        return self.alpha_bar(s) * self.spectrum / self.one_minus_alpha_bar(s)

    def snr_crossing_time(self) -> Tensor:
        """s* with SNR_k(s*) = 1: tau* = ln(2S/(S+1)) / ln S = -log1p(expm1(-L)/2) / L (1/2 at S = 1)."""
        L = self.log_spectrum
        safe = torch.where(L == 0, torch.ones_like(L), L)
        tau = torch.where(L == 0, torch.full_like(L, 0.5), -torch.log1p(torch.expm1(-safe) / 2) / safe)
        return 1 - tau.clamp(0, 1)

    def fisher_length(self) -> Tensor:
        """L* = sqrt(1/2 sum_{c,k} ln^2 S_k) summed over the spectrum's entries: a (C, H, W) spectrum
        gives the images' length; for a shared (H, W) one multiply by sqrt(C)."""
        return (0.5 * self.log_spectrum.square().sum()).sqrt()

    def prior_variance(self) -> Tensor:
        """S^(1 - s_hi) = S^(1/T): the geodesic's marginal at the first grid time."""
        return (self.log_spectrum / self.T).exp()

    def hparams(self) -> dict:
        out = {"source": self.source}
        if self.source == "constants":
            out.update(c1=self.c1, c2=self.c2, m=self.m)
        out.update(super().hparams())
        if self.ready:
            out["spectrum_shape"] = tuple(self.spectrum.shape)
        return out
