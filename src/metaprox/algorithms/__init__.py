"""Meta-gradient rules, one file each, all sharing the inner solve of :mod:`metaprox.algorithms.base`.

``ALGORITHMS`` maps a rule's short name to its class (same constructor shape: ``cls(model, loss, ...)``).
"""

from metaprox.algorithms.base import InexactInnerSolveWarning, MetaLearner, NonFiniteError
from metaprox.algorithms.finite import FiniteMMP
from metaprox.algorithms.fomaml import FOMAML
from metaprox.algorithms.hierarchical import HierarchicalMMP
from metaprox.algorithms.imaml import IMAML
from metaprox.algorithms.maml import MAML
from metaprox.algorithms.mmp import MetaMinibatchProx
from metaprox.algorithms.multihead import FiniteMultiHeadMMP, MultiHeadMMP
from metaprox.algorithms.reptile import Reptile

ALGORITHMS: dict[str, type[MetaLearner]] = {
    "mmp": MetaMinibatchProx, "maml": MAML, "fomaml": FOMAML, "reptile": Reptile, "imaml": IMAML,
}

__all__ = ["MetaLearner", "MetaMinibatchProx", "MAML", "FOMAML", "Reptile", "IMAML", "ALGORITHMS",
           "NonFiniteError", "InexactInnerSolveWarning", "FiniteMMP", "HierarchicalMMP",
           "MultiHeadMMP", "FiniteMultiHeadMMP"]
