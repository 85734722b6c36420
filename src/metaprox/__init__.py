"""metaprox: proximal meta-learning (Meta-MinibatchProx) for PyTorch."""

from metaprox.algorithms import (
    ALGORITHMS,
    FOMAML,
    IMAML,
    MAML,
    InexactInnerSolveWarning,
    MetaLearner,
    MetaMinibatchProx,
    NonFiniteError,
    Reptile,
)
from metaprox.evaluate import AdaptationCurve, adaptation_curve, mean_ci
from metaprox.models import MLP
from metaprox.prox import NoProx, SquaredL2
from metaprox.solvers import SGD, Adam, ExactLeastSquares, InnerResult, ProxProblem
from metaprox.tasks import Task, TaskDataError

__version__ = "0.1.0"

__all__ = ["Task", "TaskDataError", "MetaMinibatchProx", "MAML", "FOMAML", "Reptile", "IMAML", "ALGORITHMS",
           "MetaLearner", "SGD", "Adam", "ExactLeastSquares", "MLP", "SquaredL2", "NoProx", "InnerResult",
           "ProxProblem", "NonFiniteError", "InexactInnerSolveWarning", "adaptation_curve", "AdaptationCurve",
           "mean_ci"]
