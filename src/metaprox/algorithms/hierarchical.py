"""`HierarchicalMMP`: Meta-MinibatchProx with a tree-shaped prior of any depth in the infinite-task setting.

Tasks come from nodes of a tree root → groups → subgroups → … (e.g. Omniglot alphabet → writer). A task's
*group* is its node, named by a path ``("cyrillic", "writer3")`` (a plain name ``"cyrillic"`` is the path of
length one) or by a node name of a given ``tree``. Task t at node n is pulled toward the node's center θ_n with
λ; every node center at depth d is pulled toward its parent's center with ``lam_levels[d − 1]``; the root's
center is w (the model's parameters):

    min_{w, θ}  E_t [ φ_t(θ_node(t)) ] + Σ_{n ≠ root} (m_n λ_depth(n)/2)‖θ_n − θ_parent(n)‖²,
    φ_t(θ) = min_v L_t(v) + (λ/2)‖v − θ‖²,   m_n = share of the tasks below n.

The tree is a *prior* (who the center is), :class:`TreePrior`, attached to any learner: the outer step is
:meth:`MetaLearner.step <metaprox.algorithms.base.MetaLearner.step>` (task weights, torch.distributed reduction,
``inner_data``, monitors, carried moments), with each task solved at its node's center and the rule's meta-gradient
taken per node. :class:`HierarchicalMMP` is MMP with a :class:`TreePrior`. One outer step on a minibatch
(normalised weights â_t, â_n = Σ_{t below n} â_t): solve each task's prox problem at its node's center (batched by
shape; the center carries a leading task axis), then take envelope-gradient steps at every level (Lemma 1 at each
level; another rule's meta-gradient in place of λ(θ_n − v_t)):

    θ_n ← θ_n − η_depth(n) [ Σ_{tasks t at n} â_t λ(θ_n − v_t) + Σ_{children c} â_c λ_c(θ_n − θ_c)
                             + â_n λ_n(θ_n − θ_parent) ],

and w through the optimizer with the same gradient (no parent term). A node seen for the first time starts at
its parent's center. Two levels (``lam``, ``lam_group``) is the special case ``lam_levels = (lam_group,)``.

Adaptation of a new task whose path is known down to node k (the deepest known node; the root if none): it is
solved from θ_k with the *marginal* pull of the unknown levels integrated out. Minimising
λ/2‖v − θ_D‖² + Σ_{d=k+1}^{D} λ_d/2‖θ_d − θ_{d−1}‖² over the unknown centers θ_{k+1..D} (θ_k fixed) is a chain
of springs in series: the minimum is λ_eff/2‖v − θ_k‖² with 1/λ_eff = 1/λ + Σ_{d=k+1}^{D} 1/λ_d — the exact
infimal convolution of the quadratic pulls. Needs a squared-ℓ2 penalty with one λ (``lam`` a number).

Use: ``hm.step(tasks, where=groups)`` (one path or node name per task; a :class:`~metaprox.tasks.grouped.GroupedTasks`
minibatch carries them), ``hm.adapt(task, where=group)`` (an unseen group: from its deepest seen ancestor;
``where=None``: from the root with every level integrated out; with a ``tree``, a name that is not one of its nodes
is an error). Both are :class:`~metaprox.algorithms.base.MetaLearner`'s, unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from metaprox.algorithms.mmp import MetaMinibatchProx
from metaprox.priors import Path, Tree, TreePrior

__all__ = ["HierarchicalMMP", "TreePrior"]

Tensors = list[torch.Tensor]


class HierarchicalMMP(MetaMinibatchProx):
    """MMP with a tree prior (:class:`TreePrior`): tasks → node centers → … → root w.

    Args:
        lam: pull of a task toward its node's center.
        lam_group: two levels only — pull of a group center toward the root (same as ``lam_levels=(lam_group,)``).
        lam_levels, group_lr, tree, groups: as in :class:`TreePrior` (groups: the parameters that follow the tree).
        other arguments as in :class:`metaprox.MetaMinibatchProx` (default schedule: linear if total_steps).
    """

    def __init__(self, model, loss="mse", lam: float = 1.0, lam_group: float | None = None,
                 lam_levels: Sequence[float] | None = None, group_lr: float | Sequence[float] | None = None,
                 tree: Mapping[str, str | None] | Tree | None = None,
                 groups: Sequence[tuple[str, str]] | None = None, **kwargs):
        super().__init__(model, loss, lam, **kwargs)
        if self.prox.uniform is None:
            raise ValueError("HierarchicalMMP needs one λ for all parameters (lam a number).")
        if lam_levels is not None and lam_group is not None:
            raise ValueError("give lam_group (two levels) or lam_levels (one λ per depth), not both.")
        if lam_levels is None:
            lam_levels = tree.lam_levels if isinstance(tree, Tree) and lam_group is None else \
                [1.0 if lam_group is None else lam_group]
        if not list(lam_levels) or not all(float(v) > 0 for v in lam_levels):
            name = "lam_group" if lam_group is not None else "lam_levels"
            raise ValueError(f"{name} = {lam_group if lam_group is not None else list(lam_levels)}: "
                             f"need one λ > 0 per depth below the root.")
        self.tree_prior = TreePrior(self, lam_levels, group_lr, tree, groups)
        self.lam_levels, self.lam_group = self.tree_prior.lam_levels, self.tree_prior.lam_levels[0]

    @property
    def nodes(self) -> dict[Path, Tensors]:
        return self.tree_prior.nodes

    @property
    def depth(self) -> int:
        return self.tree_prior.depth

    @property
    def groups(self) -> dict[Hashable, Tensors]:
        """Centers of the depth-1 nodes by name (the two-level view)."""
        return {p[0]: c for p, c in self.nodes.items() if len(p) == 1}

    def path(self, group: Any, unknown_ok: bool = False) -> Path:
        return self.tree_prior.path(group, unknown_ok)

    def node_center(self, path: Path) -> Tensors:
        return self.tree_prior.node_center(path)

    def prior(self, group: Any = None) -> tuple[Tensors, float]:
        """(center, pull of the tree's parameters) a new task of ``group`` is adapted with (:meth:`TreePrior.prior`)."""
        center, scale = self.tree_prior.prior(group)
        return center, float(self.prox.uniform) * scale  # type: ignore[arg-type]
