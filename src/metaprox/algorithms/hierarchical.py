"""`HierarchicalMMP`: Meta-MinibatchProx with a tree-shaped prior of any depth in the infinite-task setting.

Tasks come from nodes of a tree root → groups → subgroups → … (e.g. Omniglot alphabet → writer). A task's
*group* is its node, named by a path ``("cyrillic", "writer3")`` (a plain name ``"cyrillic"`` is the path of
length one) or by a node name of a given ``tree``. Task t at node n is pulled toward the node's center θ_n with
λ; every node center at depth d is pulled toward its parent's center with ``lam_levels[d − 1]``; the root's
center is w (the model's parameters):

    min_{w, θ}  E_t [ φ_t(θ_node(t)) ] + Σ_{n ≠ root} (m_n λ_depth(n)/2)‖θ_n − θ_parent(n)‖²,
    φ_t(θ) = min_v L_t(v) + (λ/2)‖v − θ‖²,   m_n = share of the tasks below n.

One outer step on a minibatch (weights â_t = 1/B, â_n = Σ_{t below n} â_t): solve each task's prox problem at
its node's center (batched by shape; the center carries a leading task axis), then take envelope-gradient steps
at every level (Lemma 1 at each level):

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
from metaprox.priors import Tree, springs_in_series
from metaprox.prox import SquaredL2, TaskScaled, make_prox
from metaprox.solvers import InnerSolver, ProxProblem
from metaprox.tasks.task import Task

__all__ = ["HierarchicalMMP"]

Tensors = list[torch.Tensor]
Path = tuple[Hashable, ...]


class HierarchicalMMP(MetaLearner):
    """MMP with a tree prior: tasks → node centers → … → root w.

    Args:
        lam: pull of a task toward its node's center.
        lam_group: two levels only — pull of a group center toward the root (same as ``lam_levels=(lam_group,)``).
        lam_levels: pull toward the parent for nodes at depth 1, 2, … (one number > 0 per depth).
        group_lr: step size of the node centers: one number for every depth or one per depth (default: the
            optimizer's base learning rate).
        tree: optional ``{node: parent}`` map (one root, parent ``None``) or a :class:`metaprox.priors.Tree`,
            so that a task's group may be given as a node name; without it a group is a path.
        other arguments as in :class:`metaprox.MetaMinibatchProx`.
    """

    supports_carried_moments = False  # its own step(): the running moments would never be updated

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
        self.lam_levels = tuple(float(v) for v in lam_levels)
        if not self.lam_levels or not all(v > 0 for v in self.lam_levels):  # also rejects NaN
            name = "lam_group" if lam_group is not None else "lam_levels"
            raise ValueError(f"{name} = {lam_group if lam_group is not None else list(lam_levels)}: "
                             f"need one λ > 0 per depth below the root.")
        self.lam_group = self.lam_levels[0]
        self.group_lrs = self._level_lrs(group_lr)
        self.tree_paths = self._tree_paths(tree)
        #: node centers by path (the root, path (), is the model's parameters and not stored here)
        self.nodes: dict[Path, Tensors] = {}

    # ----- the tree ------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of levels below the root."""
        return len(self.lam_levels)

    @property
    def groups(self) -> dict[Hashable, Tensors]:
        """Centers of the depth-1 nodes by name (the two-level view)."""
        return {p[0]: c for p, c in self.nodes.items() if len(p) == 1}

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

    def path(self, group, unknown_ok: bool = False) -> Path:
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
            return self.center()
        if path not in self.nodes:
            self.nodes[path] = [t.detach().clone() for t in self.node_center(path[:-1])]
        return self.nodes[path]

    def prior(self, group=None) -> tuple[Tensors, float]:
        """(center, pull) a new task of ``group`` is adapted with: the deepest known node on its path and the
        marginal pull λ_eff of the levels below it (1/λ_eff = 1/λ + Σ 1/λ_d over the unknown levels)."""
        center, scale = self._prior(group)
        return center, float(self.prox.uniform) * scale  # type: ignore[arg-type]

    def _prior(self, group) -> tuple[Tensors, float]:
        """(center, λ_eff/λ) for :meth:`prior` and :meth:`adapt`."""
        p = self.path(group, unknown_ok=True)
        k = 0
        while k < len(p) and p[k] is not None and p[: k + 1] in self.nodes:
            k += 1
        center = self.nodes[p[:k]] if k else self.center()
        if k == len(p):
            return center, 1.0
        lam = float(self.prox.uniform)  # type: ignore[arg-type]
        return center, springs_in_series(lam, *self.lam_levels[k:len(p)]) / lam  # the unknown levels in series

    # ----- state: node centers travel with the checkpoint (as JSON-named buffers) ---------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        buffers = {}
        for path, center in self.nodes.items():  # insertion order kept: it fixes the order of the root's sum
            for name, t in zip(self.names, center):
                try:
                    key = json.dumps({"node": list(path), "param": name})
                except TypeError as e:
                    raise TypeError(f"node path {path} cannot be saved: checkpoints name nodes by JSON values "
                                    f"(str, int, float, bool); use such group names.") from e
                buffers[key] = t.clone()
        state["buffers"] = buffers
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        nodes: dict[Path, dict[str, torch.Tensor]] = {}
        for key, t in (state.get("buffers") or {}).items():
            entry = json.loads(key)
            nodes.setdefault(tuple(entry["node"]), {})[entry["param"]] = t
        for path, center in nodes.items():
            if len(path) > self.depth or set(center) != set(self.names):
                raise ValueError(f"node {path} in the state does not fit this learner ({self.depth} levels, "
                                 f"parameters {self.names}); load it into a learner built the same way.")
        super().load_state_dict(state)
        self.nodes = {path: [center[n].clone() for n in self.names] for path, center in nodes.items()}

    # ----- the outer step ------------------------------------------------------------------------------
    def step(self, tasks: Sequence[Task], groups: Sequence,  # type: ignore[override]
             monitor: bool = True) -> dict[str, float]:
        """One outer step on ``tasks`` with their groups ``groups`` (paths or names, one per task)."""
        if len(tasks) != len(groups) or not tasks:
            raise ValueError("give one group per task (and at least one task).")
        paths = [self.path(g) for g in groups]
        lam, a = float(self.prox.uniform), 1.0 / len(tasks)  # type: ignore[arg-type]
        w = self.center()
        centers = [self.node_center(p) for p in paths]
        count: dict[Path, int] = {}  # tasks below each node of the minibatch, in first-seen order
        for p in paths:
            for d in range(1, len(p) + 1):
                count[p[:d]] = count.get(p[:d], 0) + 1
        grads: dict[Path, Tensors] = {n: [torch.zeros_like(t) for t in w] for n in [(), *count]}
        stat = 0.0
        for idx in self.execution.groups(tasks):
            x, y = self.execution.stack([tasks[i] for i in idx])
            c = [torch.stack([centers[i][k] for i in idx]) for k in range(len(w))]
            res = self.inner.solve(ProxProblem(self.execution.oracle(x, y), self.prox, c),
                                   generator=self.generator, monitor=monitor)
            if monitor and res.stationarity is not None:
                stat += float(res.stationarity.sum())
            for j, i in enumerate(idx):
                for acc, cj, vj in zip(grads[paths[i]], c, res.params):
                    acc.add_(a * lam * (cj[j] - vj[j]))
        for n in count:  # each node's pull toward its parent acts on both ends
            pull = a * count[n] * self.lam_levels[len(n) - 1]
            parent = self.node_center(n[:-1])
            for acc, acc_parent, th, tp in zip(grads[n], grads[n[:-1]], self.nodes[n], parent):
                acc.add_(pull * (th - tp))
                acc_parent.add_(pull * (tp - th))
        root_grad = grads[()]
        gnorm = sum(float(t.double().square().sum()) for t in root_grad) ** 0.5
        if not all(bool(torch.isfinite(t).all()) for gg in grads.values() for t in gg):
            raise NonFiniteError(f"non-finite meta-gradient at outer step {self.step_count}.")
        factor = self.lr_factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor
        for n in count:
            lr = self.group_lrs[len(n) - 1]
            torch._foreach_add_(self.nodes[n], grads[n], alpha=-(self._base_lrs[0] if lr is None else lr) * factor)
        for p, gk in zip(self.fmodel.params(), root_grad):
            p.grad = gk.to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        out = {"step": float(self.step_count), "lr": self.optimizer.param_groups[0]["lr"], "meta_grad_norm": gnorm,
               "groups": float(len(self.nodes))}
        if monitor:
            out["inner_stationarity"] = stat / len(tasks)
        return out

    def adapt(self, task: Task, group=None, steps: int | None = None,  # type: ignore[override]
              inner: InnerSolver | None = None) -> dict[str, torch.Tensor]:
        """Parameters for ``task``: solved from the deepest known node on its path with the marginal pull of the
        levels below it (:meth:`prior`): a group whose path nobody has seen yet → from its deepest seen
        ancestor (the root if none); ``group=None`` → from the root with every level integrated out. With a
        ``tree``, a name that is not one of its nodes is an error."""
        solver = inner or self.inner
        if steps is not None:
            solver = solver.with_steps(steps)
        center, scale = self._prior(group)
        prox: SquaredL2 | TaskScaled = self.prox
        if scale != 1.0:  # λ_eff = scale·λ
            prox = TaskScaled(make_prox(float(self.prox.uniform), self.names), torch.tensor([scale]))  # type: ignore[arg-type]
        x, y = self.execution.stack([task])
        res = solver.solve(ProxProblem(self.execution.oracle(x, y), prox, [c.unsqueeze(0) for c in center]),
                           generator=self.generator, monitor=False)
        return {n: t[0] for n, t in zip(self.names, res.params)}
