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
- :class:`Graph` — weighted edges λ_ts between tasks, adding ``Σ_{edges} (λ_ts λ_g/2)‖v_t − v_s‖²`` to J. For
  task t with the others fixed, the inner problem is again a prox problem: center
  ``m_t = (s_t c_t + Σ_s (λ_ts/w_t) v_s) / (s_t + Σ_s λ_ts/w_t)`` and pull ``(s_t + Σ_s λ_ts/w_t)·λ_g``
  (:meth:`Graph.coupled`). Solving all tasks of a minibatch at once with the old neighbours is a Jacobi sweep;
  it contracts (factor max_t Σ_s(λ_ts/w_t)/(s_t + Σ_s λ_ts/w_t) < 1) whenever every s_t > 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Tree", "Graph", "springs_in_series"]


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

    Example:
        >>> t = Tree({"root": None, "a": "root", "b": "root"}, ["a", "a", "b"], [2.0])
        >>> t.depth["a"], float(t.mass[t.index["root"]])
        (1, 3.0)
    """

    def __init__(self, parent: Mapping[str, str | None], task_node: Sequence[str], lam_levels: Sequence[float],
                 weights: Any = None):
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
            while self.parent[m] is not None:
                if m in seen:
                    raise ValueError(f"the parent map has a cycle through {m!r}.")
                seen.add(m)
                m, d = self.parent[m], d + 1  # type: ignore[assignment]
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
            m: str | None = node
            while m is not None:
                self.mass[self.index[m]] += w[t]
                m = self.parent[m]
        self.children = {n: [c for c in self.nodes if self.parent[c] == n] for n in self.nodes}
        self.order = sorted(self.nodes, key=lambda n: -self.depth[n])  # leaves first

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
