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
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from metaprox.algorithms.base import MetaLearner, NonFiniteError
from metaprox.algorithms.mmp import MetaMinibatchProx
from metaprox.priors import Tree, springs_in_series
from metaprox.solve import PerTask, SolvedGroup
from metaprox.solvers import InnerSolver
from metaprox.tasks.task import Task

__all__ = ["HierarchicalMMP", "TreePrior"]

Tensors = list[torch.Tensor]
Path = tuple[Hashable, ...]


class TreePrior:
    """A tree of centers grown lazily (root w = the learner's parameters), attached to ``learner``.

    Args:
        learner: the learner whose rule, pull and outer step it uses (``learner.hierarchy`` is set to it).
        lam_levels: pull toward the parent for nodes at depth 1, 2, … (one number > 0 per depth).
        group_lr: step size of the node centers: one number for every depth or one per depth (default: the
            optimizer's base learning rate).
        tree: optional ``{node: parent}`` map (one root, parent ``None``) or a :class:`metaprox.priors.Tree`,
            so that a task's group may be given as a node name; without it a group is a path.
    """

    def __init__(self, learner: MetaLearner, lam_levels: Sequence[float],
                 group_lr: float | Sequence[float] | None = None,
                 tree: Mapping[str, str | None] | Tree | None = None):
        from metaprox.composition import refuse

        refuse(learner, prior="tree")
        self.learner = learner
        self.lam_levels = tuple(float(v) for v in lam_levels)
        if not self.lam_levels or not all(v > 0 for v in self.lam_levels):  # also rejects NaN
            raise ValueError(f"lam_levels = {list(lam_levels)}: need one λ > 0 per depth below the root.")
        self.group_lrs = self._level_lrs(group_lr)
        self.tree_paths = self._tree_paths(tree)
        #: node centers by path (the root, path (), is the model's parameters and not stored here)
        self.nodes: dict[Path, Tensors] = {}
        self._paths: list[Path] = []
        self._order: list[Path] = []
        learner.hierarchy = self

    # ----- the tree ------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of levels below the root."""
        return len(self.lam_levels)

    def _level_lrs(self, group_lr: float | Sequence[float] | None) -> tuple[float | None, ...]:
        if group_lr is None or isinstance(group_lr, (int, float)):
            lrs = (group_lr,) * self.depth
        else:
            lrs = tuple(float(v) for v in group_lr)
            if len(lrs) != self.depth:
                raise ValueError(f"group_lr has {len(lrs)} step sizes for {self.depth} levels; give one number "
                                 f"or one per depth.")
        if any(v is not None and not v > 0 for v in lrs):
            raise ValueError(f"group_lr = {group_lr}: step sizes must be > 0.")
        return lrs

    def _tree_paths(self, tree: Mapping[str, str | None] | Tree | None) -> dict[str, Path] | None:
        if tree is None:
            return None
        t = tree if isinstance(tree, Tree) else Tree(tree, [], self.lam_levels)  # validates root and cycles
        if max(t.depth.values()) > self.depth:
            raise ValueError(f"the tree is {max(t.depth.values())} levels deep but lam_levels has {self.depth}.")
        paths = {}
        for n in t.nodes:
            p, m = [], n
            while t.parent[m] is not None:
                p.append(m)
                m = t.parent[m]
            paths[n] = tuple(reversed(p))
        return paths

    def path(self, group: Any, unknown_ok: bool = False) -> Path:
        """The node path of ``group``: a path (tuple/list of names), a node name of the tree, or one name (a
        path of length one). With ``unknown_ok`` (adaptation), ``None`` stands for an unknown level and
        ``group=None`` for a task of unknown nodes at every level."""
        if group is None:
            if unknown_ok:
                return (None,) * self.depth
            raise ValueError("every task of a training step needs its group (a path or a node name), got None.")
        if isinstance(group, (tuple, list)):
            p = tuple(group)
        elif self.tree_paths is not None:
            if group not in self.tree_paths:
                raise ValueError(f"group {group!r} is not a node of the tree; give a path (a tuple of names from "
                                 f"the root's child down) for a node outside the tree.")
            p = self.tree_paths[group]
        else:
            p = (group,)
        if len(p) > self.depth:
            raise ValueError(f"group path {p} is {len(p)} levels deep but lam_levels has {self.depth}.")
        if not unknown_ok and None in p:
            raise ValueError(f"group path {p} has an unknown (None) level; training tasks need every level named.")
        return p

    def node_center(self, path: Path) -> Tensors:
        """Center of the node at ``path`` (the root's for ``()``); a new node starts at its parent's center."""
        if not path:
            return self.learner.center()
        if path not in self.nodes:
            self.nodes[path] = [t.detach().clone() for t in self.node_center(path[:-1])]
        return self.nodes[path]

    def prior(self, group: Any = None) -> tuple[Tensors, float]:
        """(center, λ_eff/λ) a new task of ``group`` is adapted with: the deepest known node on its path and the
        marginal pull of the levels below it (1/λ_eff = 1/λ + Σ 1/λ_d over the unknown levels)."""
        p = self.path(group, unknown_ok=True)
        k = 0
        while k < len(p) and p[k] is not None and p[: k + 1] in self.nodes:
            k += 1
        center = self.nodes[p[:k]] if k else self.learner.center()
        lam = self.learner.prox.uniform
        if k == len(p) or not lam:
            return center, 1.0
        return center, springs_in_series(lam, *self.lam_levels[k:len(p)]) / lam  # the unknown levels in series

    # ----- one outer step (called by MetaLearner.step) ----------------------------------------------------
    def begin(self, where: Sequence[Any] | None, total: int) -> None:
        """The paths of the whole minibatch; creates their nodes (first-seen order, the same on every rank)."""
        if where is None or len(where) != total or not total:
            raise ValueError("give one group per task (and at least one task).")
        self._paths = [self.path(g) for g in where]
        order: dict[Path, None] = {(): None}
        for p in self._paths:
            for d in range(1, len(p) + 1):
                order[p[:d]] = None
                self.node_center(p[:d])
        self._order = list(order)

    def centers(self, part: slice) -> PerTask:
        """The node center of every task of this process's share (leading task axis)."""
        cs = [self.node_center(p) for p in self._paths[part]]
        return PerTask(torch.stack(ts) for ts in zip(*cs, strict=True))

    def split(self, learner: MetaLearner, tasks: Sequence[Task], solved: list[SolvedGroup], weights: torch.Tensor,
              part: slice, grads: Tensors) -> Tensors:
        """Σ_{t at n} a_t g_t for every node n of the step (the rule's meta-gradient is linear in the weights),
        concatenated in the step's node order — one list for the reducer."""
        local = self._paths[part]
        out: Tensors = []
        for n in self._order:
            mask = weights * torch.tensor([p == n for p in local], dtype=weights.dtype)
            if bool((mask > 0).any()):
                out += learner.meta_gradient(tasks, solved, mask)
            else:
                out += [torch.zeros_like(g) for g in grads]
        return out

    def outer(self, grads: Tensors, weights: torch.Tensor) -> tuple[Tensors, Any]:
        """The chain rule: (root gradient for the optimizer, the node update). ``grads`` are the reduced,
        normalised per-node sums of :meth:`split`; each node's pull toward its parent acts on both ends with
        mass â_n = Σ_{t below n} â_t."""
        k = len(grads) // len(self._order)
        by = {n: grads[i * k:(i + 1) * k] for i, n in enumerate(self._order)}
        for n in self._order[1:]:
            mass = float(sum(float(a) for p, a in zip(self._paths, weights, strict=True) if p[:len(n)] == n))
            pull = mass * self.lam_levels[len(n) - 1]
            th, tp = self.nodes[n], self.node_center(n[:-1])
            torch._foreach_add_(by[n], torch._foreach_mul(torch._foreach_sub(th, tp), pull))
            torch._foreach_add_(by[n[:-1]], torch._foreach_mul(torch._foreach_sub(tp, th), pull))
        if not all(bool(torch.isfinite(t).all()) for g in by.values() for t in g):
            raise NonFiniteError(f"non-finite meta-gradient at outer step {self.learner.step_count}.")
        base_lr = self.learner._base_lrs[0]

        def update_nodes(factor: float) -> None:
            for n in self._order[1:]:
                lr = self.group_lrs[len(n) - 1]
                torch._foreach_add_(self.nodes[n], by[n], alpha=-(base_lr if lr is None else lr) * factor)
        return by[()], update_nodes

    # ----- test time ----------------------------------------------------------------------------------------
    def test_prior(self, tasks: Sequence[Task], lam: float | None,
                   where: Any) -> tuple[PerTask, Any, torch.Tensor]:
        """Each new task's center and pull factor (:meth:`prior`); ``where``: one group per task, one group for
        all, or None (unknown at every level)."""
        if lam is not None:
            raise ValueError("lam= overrides the pull of a flat prior; with a tree the pulls are the learner's "
                             "λ and lam_levels (build the learner with the λ you want).")
        groups = list(where) if isinstance(where, list) else [where] * len(tasks)
        if len(groups) != len(tasks):
            raise ValueError(f"got {len(groups)} groups for {len(tasks)} tasks.")
        found = [self.prior(g) for g in groups]
        center = PerTask(torch.stack(ts) for ts in zip(*[c for c, _ in found], strict=True))
        return center, self.learner.prox, torch.tensor([f for _, f in found], dtype=torch.float64)

    # ----- state: node centers travel with the checkpoint (as JSON-named buffers) ---------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        names, buffers = self.learner.names, {}
        for path, center in self.nodes.items():  # insertion order kept: it fixes the order of the root's sum
            for name, t in zip(names, center, strict=True):
                try:
                    key = json.dumps({"node": list(path), "param": name})
                except TypeError as e:
                    raise TypeError(f"node path {path} cannot be saved: checkpoints name nodes by JSON values "
                                    f"(str, int, float, bool); use such group names.") from e
                buffers[key] = t.clone()
        return buffers

    def load_state_dict(self, buffers: Mapping[str, torch.Tensor]) -> None:
        names = self.learner.names
        nodes: dict[Path, dict[str, torch.Tensor]] = {}
        for key, t in buffers.items():
            entry = json.loads(key)
            nodes.setdefault(tuple(entry["node"]), {})[entry["param"]] = t
        for path, center in nodes.items():
            if len(path) > self.depth or set(center) != set(names):
                raise ValueError(f"node {path} in the state does not fit this learner ({self.depth} levels, "
                                 f"parameters {names}); load it into a learner built the same way.")
        self.nodes = {path: [center[n].clone() for n in names] for path, center in nodes.items()}


class HierarchicalMMP(MetaMinibatchProx):
    """MMP with a tree prior (:class:`TreePrior`): tasks → node centers → … → root w.

    Args:
        lam: pull of a task toward its node's center.
        lam_group: two levels only — pull of a group center toward the root (same as ``lam_levels=(lam_group,)``).
        lam_levels, group_lr, tree: as in :class:`TreePrior`.
        other arguments as in :class:`metaprox.MetaMinibatchProx` (default schedule: linear if total_steps).
    """

    def __init__(self, model, loss="mse", lam: float = 1.0, lam_group: float | None = None,
                 lam_levels: Sequence[float] | None = None, group_lr: float | Sequence[float] | None = None,
                 tree: Mapping[str, str | None] | Tree | None = None, **kwargs):
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
        self.tree_prior = TreePrior(self, lam_levels, group_lr, tree)
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
        """(center, pull) a new task of ``group`` is adapted with (:meth:`TreePrior.prior`)."""
        center, scale = self.tree_prior.prior(group)
        return center, float(self.prox.uniform) * scale  # type: ignore[arg-type]

    def step(self, tasks: Sequence[Task], groups: Sequence[Any],  # type: ignore[override]
             monitor: bool = True, weights: Sequence[float] | torch.Tensor | None = None) -> dict[str, float]:
        """One outer step on ``tasks`` with their groups ``groups`` (paths or names, one per task)."""
        if len(tasks) != len(groups) or not tasks:
            raise ValueError("give one group per task (and at least one task).")
        diag = super().step(tasks, weights, monitor, where=groups)
        diag["groups"] = float(len(self.nodes))
        return diag

    def adapt(self, task: Task, group: Any = None, steps: int | None = None,  # type: ignore[override]
              inner: InnerSolver | None = None) -> dict[str, torch.Tensor]:
        """Parameters for ``task``: solved from the deepest known node on its path with the marginal pull of the
        levels below it (:meth:`prior`): a group whose path nobody has seen yet → from its deepest seen
        ancestor (the root if none); ``group=None`` → from the root with every level integrated out. With a
        ``tree``, a name that is not one of its nodes is an error."""
        return self._first(self.adapt_tasks([task], steps, None, inner, where=[group]))
