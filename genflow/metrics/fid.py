"""Fréchet distance, running feature statistics and kernel distance (KID).

FID (Heusel et al. 2017) is the Fréchet distance between two Gaussians fitted to feature sets:

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

``frechet_distance`` evaluates the trace term as sum_i sqrt(lambda_i) over the eigenvalues of the
symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, which has the same spectrum as S1 S2. Two symmetric
eigendecompositions in float64 are faster than a general ``sqrtm`` and never produce the complex
round-off that ``sqrtm`` has to discard; if they fail (non-finite or non-converging input) both
covariances get ``eps`` added to their diagonal, the usual fallback of the TTUR/clean-fid code.

``FeatureStats`` keeps float64 sums (n, sum f, sum f f^T), so memory is O(d^2) whatever the number
of images, statistics from several processes merge by adding the sums (a torchmetrics ``Metric``
whose states reduce with ``dist_reduce_fx="sum"``), and
mean/covariance are those of EDM's ``fid.py``: mu = sum f / n, S = (sum f f^T - n mu mu^T) / (n - 1).

``kernel_distance`` is the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y/d + 1)^3
averaged over random subsets (Binkowski et al. 2018), the KID of clean-fid and torchmetrics; each
subset's MMD^2 is torchmetrics' ``poly_mmd``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat

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


class FeatureStats(Metric):
    """Running mean/covariance of feature vectors in float64; constant memory, mergeable across ranks.

    A torchmetrics ``Metric`` whose states are the float64 sums (count, sum f, sum f f^T), all
    reduced with ``dist_reduce_fx="sum"``, so ``all_reduce`` (or ``compute``) over ranks equals one
    process that saw every feature. ``keep_features`` additionally keeps up to that many raw
    features (float32, a ``"cat"`` state gathered from every rank) for KID.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, dim: int | None = None, *, keep_features: int = 0, device=None):
        super().__init__()
        self.dim: int | None = None
        self.keep_features = int(keep_features)
        # without an explicit device the sums live where the first features come from (no host copy)
        self._follow_features = device is None
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kept", [], dist_reduce_fx="cat")
        self._num_kept = 0
        if device is not None:
            self.to(device)
        if dim is not None:
            self._alloc(dim)

    def _alloc(self, dim: int) -> None:
        self.dim = int(dim)
        self.add_state("feature_sum", torch.zeros(dim, dtype=torch.float64, device=self.device), dist_reduce_fx="sum")
        self.add_state("outer_sum", torch.zeros(dim, dim, dtype=torch.float64, device=self.device),
                       dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        """Add a batch of features, shape (B, d). Stays on the stats' device (no host sync)."""
        if not isinstance(features, Tensor):
            features = torch.as_tensor(np.asarray(features))
        features = features.reshape(features.shape[0], -1)
        if self.dim is None:
            if self._follow_features:
                self.to(features.device)
            self._alloc(features.shape[1])
        if features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: expected {self.dim}-d features, got {features.shape[1]}-d")
        f = features.to(device=self.device, dtype=torch.float64)
        self.count += f.shape[0]
        self.feature_sum += f.sum(0)
        self.outer_sum += f.T @ f
        if self._num_kept < self.keep_features:
            take = f[: self.keep_features - self._num_kept].float()
            self.kept.append(take)
            self._num_kept += take.shape[0]

    def reset(self) -> None:
        super().reset()
        self._num_kept = 0

    def compute(self) -> tuple[Tensor, Tensor]:
        """(mean, covariance) over every rank's features (torchmetrics syncs the sums for this call)."""
        return self.mean, self.cov

    def all_reduce(self, group=None) -> "FeatureStats":
        """Replace the statistics by their sum over all ranks of torch.distributed (no-op when not
        initialised); kept features (KID) are gathered from every rank, up to ``keep_features``.

        Every rank must have seen at least one batch (dim known) or have been built with ``dim``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        if self.dim is None:
            raise ValueError("FeatureStats.all_reduce needs the feature dimension: build it with dim=...")
        home = self.device
        if dist.get_backend(group) == "nccl" and home.type != "cuda":
            self.to(torch.device("cuda", torch.cuda.current_device()))
        if self.keep_features and not self.kept:
            self.kept.append(torch.zeros(0, self.dim, device=self.device))  # a 2-D empty share to gather
        # the summed states are kept; the context would otherwise restore this rank's own on exit
        with self.sync_context(process_group=group):
            reduced = dict(self.metric_state)
        for name, value in reduced.items():
            setattr(self, name, value)
        self.to(home)
        if self.keep_features:
            gathered = dim_zero_cat(reduced["kept"])[: self.keep_features]
            self.kept, self._num_kept = [gathered.to(home)], gathered.shape[0]
        return self

    def sums(self) -> dict:
        """The running sums (count, sum f, sum f f^T) and the kept raw features: what ``load_sums`` restores."""
        kept = dim_zero_cat(self.kept) if (not isinstance(self.kept, list) or self.kept) else None
        return {"count": self.count, "feature_sum": getattr(self, "feature_sum", None),
                "outer_sum": getattr(self, "outer_sum", None), "kept": kept}

    def load_sums(self, count: Tensor, feature_sum: Tensor | None, outer_sum: Tensor | None,
                  kept: Tensor | None) -> None:
        """Continue from sums saved by ``sums()`` (their exact values: the same later updates give the same
        statistics bit for bit)."""
        if feature_sum is not None:
            if self.dim is None:
                if self._follow_features:
                    self.to(feature_sum.device)
                self._alloc(feature_sum.shape[0])
            self.feature_sum.copy_(feature_sum)
            self.outer_sum.copy_(outer_sum)
        self.count.copy_(count)
        self.kept = [] if kept is None else [kept.to(self.device)]
        self._num_kept = 0 if kept is None else kept.shape[0]

    @property
    def n(self) -> int:
        return int(self.count.item())

    @property
    def mean(self) -> Tensor:
        self._require(1)
        return self.feature_sum / self.n

    @property
    def cov(self) -> Tensor:
        self._require(2)
        mu = self.feature_sum / self.n
        return (self.outer_sum - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def kept_features(self) -> Tensor:
        if isinstance(self.kept, list) and not self.kept:
            return torch.zeros(0, self.dim or 0)
        return dim_zero_cat(self.kept).cpu()  # a list of batches, or one tensor once synced

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
    a, b = FeatureStats(), FeatureStats()
    a.update(_as_f64(feats1))
    b.update(_as_f64(feats2))
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
        total += poly_mmd(x, y, degree=3, gamma=1.0 / d, coef=1.0)
    return float(total / num_subsets)
