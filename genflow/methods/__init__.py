"""Generative methods, one file per paper. See ``base.Method`` for the protocol."""
from genflow.methods.base import Method, guided, null_cond, randn

__all__ = ["Method", "guided", "null_cond", "randn"]
