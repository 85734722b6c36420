"""Meta-gradient rules, one file each, all sharing the inner solve of :mod:`metaprox.algorithms.base`."""

from metaprox.algorithms.base import InexactInnerSolveWarning, MetaLearner, NonFiniteError
from metaprox.algorithms.mmp import MetaMinibatchProx

__all__ = ["MetaLearner", "MetaMinibatchProx", "NonFiniteError", "InexactInnerSolveWarning"]
