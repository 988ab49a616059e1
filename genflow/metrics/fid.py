"""Fréchet distance, running feature statistics and kernel distance (KID).

FID (Heusel et al. 2017) is the Fréchet distance between two Gaussians fitted to feature sets:

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

``frechet_distance`` evaluates the trace term as sum_i sqrt(lambda_i) over the eigenvalues of the
symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, which has the same spectrum as S1 S2. Two symmetric
eigendecompositions in float64 are faster than a general ``sqrtm`` and never produce the complex
round-off that ``sqrtm`` has to discard; if they fail (non-finite or non-converging input) both
covariances get ``eps`` added to their diagonal, the usual fallback of the TTUR/clean-fid code.

``FeatureStats`` keeps float64 sums (n, sum f, sum f f^T), so memory is O(d^2) whatever the number
of images, statistics from several processes merge by adding the sums (one all-reduce), and
mean/covariance are those of EDM's ``fid.py``: mu = sum f / n, S = (sum f f^T - n mu mu^T) / (n - 1).

``kernel_distance`` is the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y/d + 1)^3
averaged over random subsets (Binkowski et al. 2018), the KID of clean-fid and torchmetrics.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from genflow.errors import config_error


def _as_f64(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _trace_sqrt_product(s1: Tensor, s2: Tensor) -> Tensor:
    """Tr((s1 s2)^{1/2}) for symmetric PSD s1, s2, via the spectrum of s1^{1/2} s2 s1^{1/2}."""
    w1, v1 = torch.linalg.eigh(s1)
    root1 = (v1 * w1.clamp_min(0).sqrt()) @ v1.T
    inner = root1 @ s2 @ root1
    inner = 0.5 * (inner + inner.T)  # symmetrise away round-off so eigvalsh sees an exactly symmetric matrix
    return torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    Accepts numpy arrays or tensors (any device/dtype); returns a Python float.
    """
    mu1, mu2 = _as_f64(mu1).reshape(-1), _as_f64(mu2).reshape(-1)
    s1, s2 = _as_f64(sigma1), _as_f64(sigma2)
    s1 = s1.reshape(1, 1) if s1.ndim < 2 else s1
    s2 = s2.reshape(1, 1) if s2.ndim < 2 else s2
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise config_error(
            f"frechet_distance got mismatched shapes: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}",
            "both Gaussians must live in the same feature space",
            "compare statistics made with the same feature extractor (e.g. a reference .npz for "
            "Inception has 2048-d features; digits features are smaller)",
        )
    if not (torch.isfinite(mu1).all() and torch.isfinite(mu2).all() and torch.isfinite(s1).all() and torch.isfinite(s2).all()):
        raise ValueError("frechet_distance: statistics contain NaN or inf (did generation diverge?)")
    diff = mu1 - mu2
    try:
        tr = _trace_sqrt_product(s1, s2)
        if not torch.isfinite(tr):
            raise torch.linalg.LinAlgError("non-finite trace")
    except torch.linalg.LinAlgError:
        offset = eps * torch.eye(d, dtype=torch.float64)
        tr = _trace_sqrt_product(s1 + offset, s2 + offset)
    return float(diff.dot(diff) + s1.trace() + s2.trace() - 2.0 * tr)


class FeatureStats:
    """Running mean/covariance of feature vectors in float64; constant memory, mergeable across ranks.

    ``keep_features`` additionally stores up to that many raw features (float32, on CPU) for KID.
    """

    def __init__(self, dim: int | None = None, *, keep_features: int = 0, device=None):
        self.dim = dim
        self.keep_features = int(keep_features)
        self.device = torch.device(device) if device is not None else None
        self.n = 0
        self._sum: Tensor | None = None
        self._outer: Tensor | None = None
        self._kept: list[Tensor] = []
        self._num_kept = 0
        if dim is not None:
            self._alloc(dim, self.device or torch.device("cpu"))

    def _alloc(self, dim: int, device) -> None:
        self.dim = dim
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: Tensor) -> "FeatureStats":
        """Add a batch of features, shape (B, d). Stays on the features' device (no host sync)."""
        if not isinstance(features, Tensor):
            features = torch.as_tensor(np.asarray(features))
        features = features.reshape(features.shape[0], -1)
        if self._sum is None:
            self._alloc(features.shape[1], self.device or features.device)
        if features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: expected {self.dim}-d features, got {features.shape[1]}-d")
        f = features.to(device=self._sum.device, dtype=torch.float64)
        self.n += f.shape[0]
        self._sum += f.sum(0)
        self._outer += f.T @ f
        if self._num_kept < self.keep_features:
            take = f[: self.keep_features - self._num_kept].float().cpu()
            self._kept.append(take)
            self._num_kept += take.shape[0]
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another set's statistics into this one (as if all its features were passed to update)."""
        if other.n == 0:
            return self
        if self._sum is None:
            self._alloc(other.dim, other._sum.device)
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: {self.dim}-d vs {other.dim}-d")
        self.n += other.n
        self._sum += other._sum.to(self._sum.device)
        self._outer += other._outer.to(self._outer.device)
        for k in other._kept:
            if self._num_kept >= self.keep_features:
                break
            k = k[: self.keep_features - self._num_kept]
            self._kept.append(k)
            self._num_kept += k.shape[0]
        return self

    def all_reduce(self, group=None) -> "FeatureStats":
        """Sum the statistics over all ranks of torch.distributed (no-op when not initialised).

        Every rank must have seen at least one batch (dim known) or have been built with ``dim``.
        Kept features (KID) are gathered from every rank as well.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        if self._sum is None:
            raise ValueError("FeatureStats.all_reduce needs the feature dimension: build it with dim=...")
        dev = self._sum.device
        if dist.get_backend(group) == "nccl" and dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=dev)
        s, o = self._sum.to(dev), self._outer.to(dev)
        for t in (n, s, o):
            dist.all_reduce(t, group=group)
        self.n = int(n[0].item())
        self._sum, self._outer = s.to(self._sum.device), o.to(self._outer.device)
        if self.keep_features:
            mine = self.kept_features() if self._num_kept else torch.zeros(0, self.dim)
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, mine, group=group)
            allf = torch.cat(gathered)[: self.keep_features]
            self._kept, self._num_kept = [allf], allf.shape[0]
        return self

    @property
    def mean(self) -> Tensor:
        self._require(1)
        return self._sum / self.n

    @property
    def cov(self) -> Tensor:
        self._require(2)
        mu = self._sum / self.n
        return (self._outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def kept_features(self) -> Tensor:
        return torch.cat(self._kept) if self._kept else torch.zeros(0, self.dim or 0)

    def _require(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"FeatureStats has {self.n} features; need at least {k}")

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as float64 numpy arrays, the layout of EDM and clean-fid .npz files."""
        return self.mean.cpu().numpy(), self.cov.cpu().numpy()

    def frechet_distance(self, mu, sigma) -> float:
        return frechet_distance(self.mean, self.cov, mu, sigma)


def fid_from_features(feats1, feats2) -> float:
    """FID between two feature sets (N, d) and (M, d)."""
    a, b = FeatureStats().update(_as_f64(feats1)), FeatureStats().update(_as_f64(feats2))
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def kernel_distance(
    feats1, feats2, *, num_subsets: int = 100, max_subset_size: int = 1000, generator: torch.Generator | None = None
) -> float:
    """KID: unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, averaged over random equal-size subsets.

    With subsets as large as both sets the result does not depend on the draw (MMD is permutation
    invariant), which is what the test against clean-fid uses.
    """
    f1, f2 = _as_f64(feats1), _as_f64(feats2)
    d = f1.shape[1]
    m = min(f1.shape[0], f2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("kernel_distance needs at least 2 features in each set")
    gen = generator or torch.Generator().manual_seed(0)
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(num_subsets):
        x = f2[torch.randperm(f2.shape[0], generator=gen)[:m]]
        y = f1[torch.randperm(f1.shape[0], generator=gen)[:m]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        total += within - 2 * kxy.sum() / (m * m)
    return float(total / num_subsets)
