"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", Sec. 3), as EDM2 reports them next to FID.

Each set of features approximates its manifold by the union of balls around its points, each ball's
radius the distance to that point's k-th nearest neighbour within the set (k = 3, the paper's choice):

    f(x, S) = 1  if  ||x - s|| <= ||s - NN_k(s, S)||  for some s in S,  else 0
    precision = mean over generated g of f(g, real)      (how many samples lie on the real manifold)
    recall    = mean over real r of f(r, generated)      (how much of the real manifold is covered)

Distances are Euclidean in feature space, computed in row blocks (``block`` rows against the whole other
set at a time) so that memory stays at block x N.
"""
from __future__ import annotations

import torch
from torch import Tensor


def knn_radii(features: Tensor, k: int = 3, block: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest neighbour among the others (the point itself excluded)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {n}")
    radii = []
    for start in range(0, n, block):
        d = torch.cdist(features[start:start + block], features)
        # the smallest distance of a row is the point to itself (0); the k-th neighbour is the (k+1)-th smallest
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(queries: Tensor, support: Tensor, radii: Tensor, block: int = 1024) -> Tensor:
    """For each query, whether it lies in some ball (support point, radius): a bool per query."""
    inside = []
    for start in range(0, queries.shape[0], block):
        d = torch.cdist(queries[start:start + block], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: Tensor, generated: Tensor, k: int = 3, block: int = 1024) -> dict[str, float]:
    """``{"precision": ..., "recall": ...}`` of generated features against real ones, (N, d) and (M, d),
    computed in float64."""
    real, generated = real.double(), generated.double()
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {generated.shape[1]}")
    real_radii = knn_radii(real, k, block)
    generated_radii = knn_radii(generated, k, block)
    precision = manifold_coverage(generated, real, real_radii, block).double().mean()
    recall = manifold_coverage(real, generated, generated_radii, block).double().mean()
    return {"precision": float(precision), "recall": float(recall)}
