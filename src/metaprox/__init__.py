"""metaprox: proximal meta-learning (Meta-MinibatchProx) for PyTorch."""

from metaprox.algorithms import (
    ALGORITHMS,
    FOMAML,
    IMAML,
    MAML,
    FiniteMMP,
    FiniteMultiHeadMMP,
    HierarchicalMMP,
    InexactInnerSolveWarning,
    MetaLearner,
    MetaMinibatchProx,
    MultiHeadMMP,
    NonFiniteError,
    Reptile,
)
from metaprox.evaluate import AdaptationCurve, adaptation_curve, mean_ci
from metaprox.models import MLP, SharedTrunk
from metaprox.priors import Graph, Tree
from metaprox.prox import GroupL2, NoProx, RobustL2, SquaredL2, TaskScaled
from metaprox.solvers import SGD, Adam, AdamMoments, ExactLeastSquares, InnerResult, ProxProblem
from metaprox.store import MemmapStore, MemoryStore
from metaprox.tasks import Task, TaskDataError
from metaprox.tasks.taskset import GeneratedTaskSet, TaskSampler, TaskSet, task_lam_factors

__version__ = "0.1.0"

__all__ = ["Task", "TaskDataError", "MetaMinibatchProx", "MAML", "FOMAML", "Reptile", "IMAML", "ALGORITHMS",
           "MetaLearner", "SGD", "Adam", "AdamMoments", "ExactLeastSquares", "MLP", "SquaredL2", "NoProx",
           "InnerResult", "ProxProblem", "NonFiniteError", "InexactInnerSolveWarning", "adaptation_curve",
           "AdaptationCurve", "mean_ci", "FiniteMMP", "HierarchicalMMP", "TaskSet", "GeneratedTaskSet", "TaskSampler",
           "task_lam_factors", "GroupL2", "TaskScaled", "RobustL2", "MemoryStore", "MemmapStore", "Tree", "Graph",
           "MultiHeadMMP", "FiniteMultiHeadMMP", "SharedTrunk"]
