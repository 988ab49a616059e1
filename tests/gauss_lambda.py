"""Shared test oracle: the closed-form data separation function of Gaussian data."""
import torch

F64 = torch.float64


class GaussLambda:
    """Closed-form separation function of N(0, diag(v)) data: 1 - lambda(s) = mean_v v / (1 + s^2 v)."""

    def __init__(self, variances):
        self.v = torch.as_tensor(variances, dtype=F64)

    def mmse(self, s):
        s = torch.as_tensor(s, dtype=F64)
        return (self.v / (1 + s[..., None] ** 2 * self.v)).mean(-1)

    def __call__(self, s):
        return 1 - self.mmse(s)
