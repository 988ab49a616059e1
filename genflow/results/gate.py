"""The regression gate: an entry fails when its FID is worse than its last record on the same suite and
settings by more than ``max(k * pooled std, tolerance)``.

The figure compared is the mean FID over seed sets; the pooled standard deviation is that of the two runs'
seed sets, sqrt(((n1 - 1) s1^2 + (n2 - 1) s2^2) / (n1 + n2 - 2)) — the spread a rerun of the same model
shows from the choice of seeds alone. With one seed set per run there is no spread and the tolerance
alone decides. ``k`` and ``tolerance`` come from the suite's ``gate:`` section.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

DEFAULT_K = 3.0
DEFAULT_TOLERANCE = 0.0


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """Pooled sample standard deviation of two groups; 0 when neither has two values."""
    dof = len(a) + len(b) - 2
    if dof <= 0:
        return 0.0
    ss = sum((v - sum(a) / len(a)) ** 2 for v in a) + sum((v - sum(b) / len(b)) ** 2 for v in b)
    return math.sqrt(ss / dof)


@dataclass
class Verdict:
    entry: str
    before: float
    after: float
    allowed: float
    before_commit: str
    before_date: str

    @property
    def regressed(self) -> bool:
        return self.after - self.before > self.allowed

    def describe(self) -> str:
        return (f"{self.entry}: FID {self.after:.4f} now vs {self.before:.4f} at {self.before_commit} "
                f"({self.before_date}), worse by {self.after - self.before:.4f} > allowed {self.allowed:.4f}")


def compare(before: dict, after: dict, *, k: float = DEFAULT_K, tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """Gate ``after`` (this run's record) against ``before`` (its last record with the same settings)."""
    allowed = max(k * pooled_std(before["fid_sets"], after["fid_sets"]), tolerance)
    return Verdict(after["entry"], float(before["fid_mean"]), float(after["fid_mean"]), allowed,
                   str(before.get("commit")), str(before.get("date")))
