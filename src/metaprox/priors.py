"""Who the center is: flat (every task → w), a tree of group centers, or a graph between tasks.

Everything works on *rows*: flat parameter vectors ``(P,)`` laid out by :class:`metaprox.store.ParamLayout`;
``group_lams`` is the per-entry λ_g of the task-level penalty (a ``(P,)`` vector: 0 for private, finite for
prox-coupled entries; shared entries never move and are excluded by the caller).

- :class:`Tree` — root → groups → … ; tasks attach to any node. Node n ≠ root is pulled toward its parent with
  λ of its depth (``lam_levels[depth − 1]``), weighted by its mass m_n = Σ_{tasks below n} w_t. The finite
  joint objective is

      J = Σ_t w_t [L_t(v_t) + (s_t λ_g/2)‖v_t − θ_node(t)‖²] + Σ_{n ≠ root} (m_n λ_depth(n)/2)‖θ_n − θ_parent(n)‖²

  and :meth:`Tree.update_nodes` minimises it exactly over every node in turn (block coordinate: each node is
  the weighted mean of its tasks, children and parent). The root is the meta-parameter w. The tasks enter only
  through per-node sums Σ pull·v and Σ pull (:meth:`Tree.task_sums`), so the sweep can run from sums that
  torch.distributed ranks all-reduce (:meth:`Tree.update_nodes_from_sums`).
- :class:`TreePrior` — a tree grown lazily (nodes named by paths) over the infinite task stream, attached to any
  learner: each task is solved at its node's center, the rule's meta-gradient is taken per node, and the nodes
  move by gradient steps inside the learner's one outer step (:class:`~metaprox.algorithms.HierarchicalMMP` is
  MMP with it). Per parameter group: ``groups`` (rules pattern → ``"tree"`` | ``"flat"``, :func:`partition`)
  choose which parameters follow the tree; a flat group's center is w for every task (the whole tree is the
  case ``groups=None``; a tree on the head with a flat trunk is ``[("head.*", "tree"), ("*", "flat")]``).
- :class:`Graph` — weighted edges λ_ts between tasks, adding ``Σ_{edges} (λ_ts λ_g/2)‖v_t − v_s‖²`` to J. For
  task t with the others fixed, the inner problem is again a prox problem: center
  ``m_t = (s_t c_t + Σ_s (λ_ts/w_t) v_s) / (s_t + Σ_s λ_ts/w_t)`` and pull ``(s_t + Σ_s λ_ts/w_t)·λ_g``
  (:meth:`Graph.coupled`). Solving all tasks of a minibatch at once with the old neighbours is a Jacobi sweep;
  it contracts (factor max_t Σ_s(λ_ts/w_t)/(s_t + Σ_s λ_ts/w_t) < 1) whenever every s_t > 0.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import math
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from metaprox.solve import PerTask, SolvedGroup
from metaprox.tasks.task import Task

__all__ = ["Tree", "Graph", "TreePrior", "springs_in_series", "partition", "GROUP_PRIORS"]

Tensors = list[torch.Tensor]
Path = tuple[Hashable, ...]


#: the priors a parameter group of a :class:`TreePrior` can follow
GROUP_PRIORS = ("tree", "flat")


def _matches(pattern: str, name: str) -> bool:
    """A glob (``fnmatch``, case-sensitive) or, prefixed ``re:``, a regular expression matching the whole name."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}.") from e
    return fnmatch.fnmatchcase(name, pattern)


def partition(names: Sequence[str], rules: Sequence[tuple[str, str]], default: str | None = None) -> list[str]:
    """The label of every parameter name: the label of the first rule ``(pattern, label)`` whose pattern matches
    it, else ``default`` (like ``optax.partition``; a pattern is a glob or ``re:<regex>``).

    Raises ``ValueError`` naming the parameter or the pattern when a name matches no rule and there is no
    default, when a pattern matches no parameter (a typo), and when a pattern matches only parameters that
    earlier rules already took (it would never apply: reorder or remove it).

    Example:
        >>> partition(["trunk.w", "head.w", "head.b"], [("head.*", "tree")], default="flat")
        ['flat', 'tree', 'tree']
    """
    labels: list[str | None] = [None] * len(names)
    taken_by: dict[str, str] = {}
    for pattern, label in rules:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"a parameter-group pattern must be a non-empty string, got {pattern!r}.")
        hits = [i for i, n in enumerate(names) if _matches(pattern, n)]
        if not hits:
            raise ValueError(f"pattern {pattern!r} matches no parameter; the parameters are {list(names)}.")
        new = [i for i in hits if labels[i] is None]
        if not new:
            first = names[hits[0]]
            raise ValueError(f"pattern {pattern!r} matches only parameters that earlier patterns took (e.g. "
                             f"{first!r} by {taken_by[first]!r}; first match wins): reorder or remove it.")
        for i in new:
            labels[i], taken_by[names[i]] = label, pattern
    out: list[str] = []
    for n, found in zip(names, labels, strict=True):
        if found is None and default is None:
            raise ValueError(f"parameter {n!r} matches none of the patterns {[p for p, _ in rules]}; add a "
                             f"catch-all rule ('*') or a default.")
        out.append(found if found is not None else default)  # type: ignore[arg-type]
    return out


def springs_in_series(*lams: float) -> float:
    """The pull of quadratic springs λ_1, …, λ_k in series: min over the k − 1 intermediate points of
    Σ_i (λ_i/2)(x_i − x_{i−1})² is (λ_eff/2)(x_k − x_0)² with 1/λ_eff = Σ_i 1/λ_i (0 if any λ_i is 0, a free
    link; λ_i = ∞ is a rigid one, as long as one λ_i is finite). This is how a new task under a node nobody
    has seen is pulled toward the nearest known center, with the unknown centers integrated out."""
    if any(lam == 0 for lam in lams):
        return 0.0
    if not lams or all(math.isinf(lam) for lam in lams):
        raise ValueError(f"springs_in_series{tuple(lams)}: need at least one finite λ (all rigid: the pull is ∞).")
    return 1.0 / sum(1.0 / lam for lam in lams)


class Tree:
    """A tree of centers with λ per level and tasks attached to nodes.

    Args:
        parent: ``{node: parent}`` with exactly one root (parent ``None``).
        task_node: the node of each task (index t → node name).
        lam_levels: pull toward the parent for nodes at depth 1, 2, … (one number per depth below the root).
        weights: task weights w_t (default 1).
        groups: which parameters follow the tree, as in :class:`TreePrior` (rules ``(pattern, "tree" |
            "flat")``, unmatched names flat; None: all). A flat parameter has one value at every node — the
            λ-weighted mean of all tasks' v_t, the exact minimiser of J with those entries tied to the root.
            The learner binds the rules to its parameters (:meth:`bind`) before the first sweep.

    Example:
        >>> t = Tree({"root": None, "a": "root", "b": "root"}, ["a", "a", "b"], [2.0])
        >>> t.depth["a"], float(t.mass[t.index["root"]])
        (1, 3.0)
    """

    def __init__(self, parent: Mapping[str, str | None], task_node: Sequence[str], lam_levels: Sequence[float],
                 weights: Any = None, groups: Sequence[tuple[str, str]] | None = None):
        roots = [n for n, p in parent.items() if p is None]
        if len(roots) != 1:
            raise ValueError(f"a Tree needs exactly one root (parent None), got {roots}.")
        for n, p in parent.items():
            if p is not None and p not in parent:
                raise ValueError(f"node {n!r} has unknown parent {p!r}.")
        self.root = roots[0]
        self.nodes = list(parent)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.parent = dict(parent)
        self.depth: dict[str, int] = {}
        for n in self.nodes:
            d, m, seen = 0, n, set()
            while (up := self.parent[m]) is not None:
                if m in seen:
                    raise ValueError(f"the parent map has a cycle through {m!r}.")
                seen.add(m)
                m, d = up, d + 1
            self.depth[n] = d
        self.lam_levels = [float(v) for v in lam_levels]
        if len(self.lam_levels) < max(self.depth.values()) or any(v <= 0 for v in self.lam_levels):
            raise ValueError(f"lam_levels needs one λ > 0 per depth 1..{max(self.depth.values())}.")
        unknown = set(task_node) - set(self.nodes)
        if unknown:
            raise ValueError(f"tasks attach to unknown nodes {sorted(unknown)}.")
        self.task_node = np.array([self.index[n] for n in task_node], dtype=np.int64)
        w = torch.ones(len(task_node), dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).flatten()
        self.weights = w  # the node masses m_n below come from these: they must be the task set's weights
        self.mass = torch.zeros(len(self.nodes), dtype=torch.float64)
        for t, node in enumerate(task_node):
            at: str | None = node
            while at is not None:
                self.mass[self.index[at]] += w[t]
                at = self.parent[at]
        self.children = {n: [c for c in self.nodes if self.parent[c] == n] for n in self.nodes}
        self.order = sorted(self.nodes, key=lambda n: -self.depth[n])  # leaves first
        self.groups = None if groups is None else list(groups)
        #: per parameter name: does it follow the tree (set by :meth:`bind`; None: every parameter does)
        self.follows: dict[str, bool] | None = None
        self.flat_entries: torch.Tensor | None = None  # (P,) bool: the entries of the flat parameters

    def bind(self, names: Sequence[str], sizes: Sequence[int]) -> None:
        """Resolve ``groups`` over the learner's parameter ``names`` (each of ``sizes`` entries in a row);
        errors name the pattern or parameter at fault (:func:`partition`)."""
        follows = TreePrior.follows_of(names, self.groups)
        self.follows = dict(zip(names, follows, strict=True))
        flat = torch.cat([torch.full((int(k),), not on) for k, on in zip(sizes, follows, strict=True)])
        self.flat_entries = flat if bool(flat.any()) else None

    def lam_up(self, node: str) -> float:
        """Pull of ``node`` toward its parent (0 for the root)."""
        d = self.depth[node]
        return 0.0 if d == 0 else self.lam_levels[d - 1]

    def centers(self, theta: torch.Tensor, tasks: np.ndarray) -> torch.Tensor:
        """Center rows ``(B, P)`` of tasks: their nodes' θ."""
        return theta[torch.from_numpy(self.task_node[tasks])]

    def penalty(self, theta: torch.Tensor) -> float:
        """Σ_{n ≠ root} (m_n λ_n/2)‖θ_n − θ_parent‖² (the tree part of the joint objective)."""
        total = 0.0
        for n in self.nodes:
            if self.parent[n] is not None:
                i, p = self.index[n], self.index[self.parent[n]]  # type: ignore[index]
                total += 0.5 * float(self.mass[i]) * self.lam_up(n) * float((theta[i] - theta[p]).square().sum())
        return total

    def task_sums(self, v: torch.Tensor, task_pull: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-node sufficient statistics of the tasks attached to each node: ``(Σ pull·v, Σ pull)``, each
        ``(N, P)``, from the rows ``v`` ``(n, P)`` of *all* tasks and ``task_pull`` ``(n, P)`` = w_t·s_t·λ_g."""
        node_of = torch.from_numpy(self.task_node)
        num = torch.zeros(len(self.nodes), v.shape[1], dtype=v.dtype).index_add_(0, node_of, task_pull * v)
        den = torch.zeros(len(self.nodes), v.shape[1], dtype=v.dtype).index_add_(0, node_of, task_pull)
        return num, den

    def update_nodes(self, theta: torch.Tensor, v: torch.Tensor, task_pull: torch.Tensor,
                     sweeps: int = 1) -> torch.Tensor:
        """Exact block-coordinate minimisation of J over every node (leaves first, then root first).

        ``v`` are the rows of *all* tasks ``(n, P)``; ``task_pull`` ``(n, P)`` is w_t·s_t·λ_g per entry.
        Returns the new θ ``(N, P)``; an entry with zero total weight keeps its value.
        """
        return self.update_nodes_from_sums(theta, *self.task_sums(v, task_pull), sweeps=sweeps)

    def update_nodes_from_sums(self, theta: torch.Tensor, num: torch.Tensor, den: torch.Tensor,
                               sweeps: int = 1) -> torch.Tensor:
        """:meth:`update_nodes` from the per-node task sums of :meth:`task_sums` (the tasks enter the sweep only
        through them, so ranks that each hold some tasks can all-reduce the sums and run the same sweep)."""
        if self.groups is not None and self.follows is None:
            raise ValueError("this Tree has parameter groups: bind it to the learner's parameters first "
                             "(Tree.bind(names, sizes); FiniteMMP does).")
        theta = theta.clone()
        for _ in range(int(sweeps)):
            for n in self.order + self.order[::-1]:
                i = self.index[n]
                nu, de = num[i].clone(), den[i].clone()
                for c in self.children[n]:
                    k = self.mass[self.index[c]].item() * self.lam_up(c)
                    nu += k * theta[self.index[c]]
                    de += k
                if self.parent[n] is not None:
                    k = self.mass[i].item() * self.lam_up(n)
                    nu += k * theta[self.index[self.parent[n]]]  # type: ignore[index]
                    de += k
                theta[i] = torch.where(de > 0, nu / de.clamp_min(1e-300), theta[i])
        if self.flat_entries is not None:  # entries are independent: the flat ones get one value at every node,
            f = self.flat_entries            # the pull-weighted mean of all tasks (the root's old value if none)
            total, mass = num[:, f].sum(0), den[:, f].sum(0)
            theta[:, f] = torch.where(mass > 0, total / mass.clamp_min(1e-300), theta[self.index[self.root], f])
        return theta


class Graph:
    """Undirected weighted edges ``(t, s, λ_ts)`` between the tasks of a finite set (each edge listed once)."""

    def __init__(self, num_tasks: int, edges: Sequence[tuple[int, int, float]]):
        self.n = int(num_tasks)
        e = np.asarray(edges, dtype=np.float64).reshape(-1, 3)
        src, dst, w = e[:, 0].astype(np.int64), e[:, 1].astype(np.int64), e[:, 2]
        if e.size and (src.min() < 0 or dst.min() < 0 or max(src.max(), dst.max()) >= self.n):
            raise ValueError("graph edge endpoint out of range.")
        if bool((src == dst).any()) or bool((w < 0).any()) or not np.isfinite(w).all():
            raise ValueError("graph edges need two different endpoints and a finite weight ≥ 0.")
        self.edges = (src, dst, w)
        a = np.concatenate([src, dst])
        b = np.concatenate([dst, src])
        ww = np.concatenate([w, w])
        order = np.lexsort((b, a))
        self.col, self.val = b[order], ww[order]
        self.crow = np.zeros(self.n + 1, dtype=np.int64)
        np.add.at(self.crow, a + 1, 1)
        self.crow = np.cumsum(self.crow)

    def neighbours(self, tasks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in ``tasks``, neighbour index, weight) for every edge leaving the given tasks."""
        starts, ends = self.crow[tasks], self.crow[tasks + 1]
        counts = ends - starts
        pos = np.repeat(np.arange(len(tasks)), counts)
        offs = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
        return pos, self.col[offs], self.val[offs]

    def coupled(self, tasks: np.ndarray, center: torch.Tensor, rows_of: Any, s: torch.Tensor,
                w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pull factors ``(B,)``, centers ``(B, P)``) of the per-task prox problems with neighbours fixed.

        ``center`` ``(B, P)`` are the tasks' own centers c_t, ``rows_of(idx)`` returns the current rows of
        tasks ``idx``, ``s`` the tasks' pull factors s_t and ``w`` their weights w_t.
        """
        pos, nb, val = self.neighbours(tasks)
        k = torch.from_numpy(val).to(center.dtype) / w[torch.from_numpy(pos)].to(center.dtype)
        nb_sum = torch.zeros_like(center).index_add_(0, torch.from_numpy(pos), k.unsqueeze(1) * rows_of(nb))
        kt = torch.zeros(len(tasks), dtype=center.dtype).index_add_(0, torch.from_numpy(pos), k)
        scale = s.to(center.dtype) + kt
        return scale, (s.to(center.dtype).unsqueeze(1) * center + nb_sum) / scale.clamp_min(1e-300).unsqueeze(1)

    def endpoints(self) -> np.ndarray:
        """The sorted ids of the tasks that have an edge (the rows :meth:`penalty` reads)."""
        src, dst, _ = self.edges
        return np.unique(np.concatenate([src, dst]))

    def penalty(self, rows: torch.Tensor, lam_entries: torch.Tensor, tasks: np.ndarray | None = None) -> float:
        """Σ_{edges} (λ_ts/2) Σ_entries λ_g (v_t − v_s)² from the rows ``(len(tasks), P)`` of the sorted task ids
        ``tasks`` (default: all n tasks; they must include every :meth:`endpoints` id)."""
        src, dst, w = self.edges
        if len(src) == 0:
            return 0.0
        if tasks is not None:
            src, dst = np.searchsorted(tasks, src), np.searchsorted(tasks, dst)
        d = rows[torch.from_numpy(src)] - rows[torch.from_numpy(dst)]
        return 0.5 * float((torch.from_numpy(w).to(rows.dtype) * (d.square() * lam_entries).sum(1)).sum())


class TreePrior:
    """A tree of centers grown lazily (root w = the learner's parameters), attached to ``learner``.

    Args:
        learner: the learner whose rule, pull and outer step it uses (``learner.hierarchy`` is set to it).
        lam_levels: pull toward the parent for nodes at depth 1, 2, … (one number > 0 per depth).
        group_lr: step size of the node centers: one number for every depth or one per depth (default: the
            optimizer's base learning rate).
        tree: optional ``{node: parent}`` map (one root, parent ``None``) or a :class:`metaprox.priors.Tree`,
            so that a task's group may be given as a node name; without it a group is a path.
        groups: which parameters follow the tree: rules ``(pattern, "tree" | "flat")`` over the learner's
            parameter names, first match wins, unmatched names are ``"flat"`` (:func:`partition`); None: all
            follow it. A flat parameter's center is w for every task (its meta-gradient goes to w whichever
            node the task sits at; the nodes hold a copy of w there).
    """

    def __init__(self, learner: Any, lam_levels: Sequence[float],
                 group_lr: float | Sequence[float] | None = None,
                 tree: Mapping[str, str | None] | Tree | None = None,
                 groups: Sequence[tuple[str, str]] | None = None):
        from metaprox.composition import refuse

        refuse(learner, prior="tree")
        if getattr(learner, "places", None):  # where= would have to name each task's kind and its node
            raise ValueError(f"{type(learner).__name__}: step(where=...) gives each task's {learner.places}; a tree "
                             f"prior over it (a {learner.places} and a node per task) is not built. Use its "
                             f"per-group λ (lam={{pattern: λ}}) or a flat MetaMinibatchProx with private head groups.")
        self.learner = learner
        self.follows = self.follows_of(learner.names, groups)
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

    @staticmethod
    def follows_of(names: Sequence[str], groups: Sequence[tuple[str, str]] | None) -> list[bool]:
        """Per parameter: does it follow the tree (else its center is w)?"""
        if groups is None:
            return [True] * len(names)
        rules = [tuple(r) for r in groups]
        for r in rules:
            if len(r) != 2 or r[1] not in GROUP_PRIORS:
                raise ValueError(f"group rule {r!r}: give (pattern, prior) with prior one of {GROUP_PRIORS}.")
        follows = [label == "tree" for label in partition(names, rules, default="flat")]  # type: ignore[arg-type]
        if not any(follows):
            raise ValueError(f"no parameter follows the tree (groups = {rules}): the prior would be flat; drop "
                             f"the tree or give a rule (pattern, 'tree') that matches one of {list(names)}.")
        return follows

    @property
    def per_group(self) -> bool:
        """Some parameters are flat (their center is w for every task)."""
        return not all(self.follows)

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
        paths: dict[str, Path] = {}
        for n in t.nodes:
            p, m = [], n
            while (up := t.parent[m]) is not None:
                p.append(m)
                m = up
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
        w = self.learner.center()
        if not path:
            return w
        if path not in self.nodes:
            self.nodes[path] = [t.detach().clone() for t in self.node_center(path[:-1])]
        if not self.per_group:
            return self.nodes[path]
        return [t if on else wi for t, wi, on in zip(self.nodes[path], w, self.follows, strict=True)]

    def prior(self, group: Any = None) -> tuple[Tensors, float]:
        """(center, λ_eff/λ) a new task of ``group`` is adapted with: the deepest known node on its path and the
        marginal pull of the levels below it (1/λ_eff = 1/λ + Σ 1/λ_d over the unknown levels)."""
        p = self.path(group, unknown_ok=True)
        k = 0
        while k < len(p) and p[k] is not None and p[: k + 1] in self.nodes:
            k += 1
        center = self.node_center(p[:k])
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

    def split(self, learner: Any, tasks: Sequence[Task], solved: list[SolvedGroup], weights: torch.Tensor,
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
            th, tp = self.node_center(n), self.node_center(n[:-1])  # equal on flat parameters: no pull there
            torch._foreach_add_(by[n], torch._foreach_mul(torch._foreach_sub(th, tp), pull))
            torch._foreach_add_(by[n[:-1]], torch._foreach_mul(torch._foreach_sub(tp, th), pull))
            for i, on in enumerate(self.follows):  # a flat parameter's center is w: its gradient is w's
                if not on:
                    by[()][i] = by[()][i] + by[n][i]
                    by[n][i] = torch.zeros_like(by[n][i])
        if not all(bool(torch.isfinite(t).all()) for g in by.values() for t in g):
            from metaprox.algorithms.base import NonFiniteError

            raise NonFiniteError(f"non-finite meta-gradient at outer step {self.learner.step_count}.")
        base_lr = self.learner.base_lrs[0]

        def update_nodes(factor: float) -> None:
            w = self.learner.center()  # after the optimizer's step
            for n in self._order[1:]:
                lr = self.group_lrs[len(n) - 1]
                torch._foreach_add_(self.nodes[n], by[n], alpha=-(base_lr if lr is None else lr) * factor)
                for t, wi, on in zip(self.nodes[n], w, self.follows, strict=True):
                    if not on:  # stored as w, so that a node's tensors are its center
                        t.copy_(wi)
        return by[()], update_nodes

    # ----- test time ----------------------------------------------------------------------------------------
    def test_prior(self, tasks: Sequence[Task], lam: float | None,
                   where: Any) -> tuple[PerTask, Any, torch.Tensor | None]:
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
        factors = torch.tensor([f for _, f in found], dtype=torch.float64)
        if not self.per_group or bool((factors == 1).all()):
            return center, self.learner.prox, factors
        # the unknown levels weaken the pull of the tree's parameters only; flat ones keep λ (one factor per call)
        if not bool((factors == factors[0]).all()):
            raise ValueError("with a per-group tree, tasks whose paths are known to different depths are adapted "
                             "with different per-group pulls: adapt them in separate calls (one known depth each).")
        from metaprox.prox import make_prox

        lam, f = float(self.learner.prox.uniform), float(factors[0])
        pulls = {n: lam * f if on else lam for n, on in zip(self.learner.names, self.follows, strict=True)}
        return center, make_prox({glob.escape(n): v for n, v in pulls.items()}, self.learner.names), None

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
