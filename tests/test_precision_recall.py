"""Improved precision and recall (Kynkäänniemi et al. 2019, k = 3): a case worked by hand, closed forms, an
independent brute-force computation, and the metrics next to FID in evaluate."""
import json
import math

import numpy as np
import pytest
import torch

from genflow.metrics.precision_recall import knn_radii, precision_recall


def brute_force(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The paper's definition, one point at a time with Python loops."""
    def radius(points, i):
        others = sorted(math.dist(points[i], points[j]) for j in range(len(points)) if j != i)
        return others[k - 1]

    def covered(x, support):
        return any(math.dist(x, support[i]) <= radius(support, i) for i in range(len(support)))

    precision = sum(covered(g, real) for g in fake) / len(fake)
    recall = sum(covered(r, fake) for r in real) / len(real)
    return precision, recall


def test_a_case_worked_by_hand():
    # real 0, 1, 2, 3, 10: 3rd-neighbour radii 3, 2, 2, 3, 9. Generated 5 (within 3 + 3), 20 (10 + 9 < 20),
    # -4 (0 + 3 < 4), 1.5: precision 2/4. Generated radii (3rd neighbour = farthest other) 15, 24, 24, 18.5
    # cover every real point: recall 1.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = torch.tensor([[5.0], [20.0], [-4.0], [1.5]])
    assert knn_radii(real).tolist() == [3.0, 2.0, 2.0, 3.0, 9.0]
    assert knn_radii(fake).tolist() == [15.0, 24.0, 24.0, 18.5]
    assert precision_recall(real, fake) == {"precision": 0.5, "recall": 1.0}


def test_closed_forms():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == {"precision": 1.0, "recall": 1.0}  # a set covers itself
    assert precision_recall(x, x + 1e3) == {"precision": 0.0, "recall": 0.0}  # far apart: no overlap
    # generated = a tight cluster at one real point: every sample is on the real manifold, but it covers
    # only the real points inside the cluster's tiny balls
    tight = x[:1] + 1e-4 * torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    got = precision_recall(x, tight)
    assert got["precision"] == 1.0 and got["recall"] == pytest.approx(1 / 50)


@pytest.mark.parametrize("seed, n, m, d", [(0, 30, 25, 4), (1, 12, 40, 2), (2, 20, 20, 16)])
def test_matches_a_brute_force_computation(seed, n, m, d):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, d))
    fake = rng.normal(loc=0.3, scale=1.3, size=(m, d))
    want = brute_force(real.tolist(), fake.tolist())
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), block=7)  # blocks do not matter
    assert (got["precision"], got["recall"]) == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 or 0 < got["recall"] < 1  # a case that discriminates


def test_evaluate_reports_precision_recall_and_kid_next_to_fid(trained_ckpt, tmp_path, monkeypatch, capsys):
    from genflow.apps.evaluate import main

    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    out = main([f"ckpt={trained_ckpt}", "fid.num=60", "fid.steps=3", "fid.batch_size=60", "fid.kid=true",
                "fid.pr=true", "fid.pr_num=500", "device=cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert 0 <= out["pr_precision"] <= 1 and 0 <= out["pr_recall"] <= 1 and math.isfinite(out["kid"])
    assert math.isfinite(out["fid"]) and "fd_dinov2" not in out  # digits features: no DINOv2 figure
