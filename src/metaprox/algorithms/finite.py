"""`FiniteMMP`: Meta-MinibatchProx on a *finite* set of named tasks whose parameters persist between steps.

The paper's infinite-task objective becomes a finite joint problem (regularized multi-task learning,
Evgeniou & Pontil 2004, with a learned center):

    J(w, v_1..v_n) = Σ_t w_t [L_t(v_t) + D_t(v_t, c_t)]  (+ graph terms Σ_edges λ_ts λ_g/2 ‖v_t − v_s‖²)
                                                           (+ tree terms Σ_nodes m_n λ_n/2 ‖θ_n − θ_parent‖²)

with D_t = s_t·D (per-task pull λ_t = s_t·λ, :func:`~metaprox.tasks.taskset.task_lam_factors`), c_t = w (flat),
the task's tree node θ_node(t) (:class:`~metaprox.priors.Tree`), and graph neighbours folded into the center
(:class:`~metaprox.priors.Graph`). One outer step (:meth:`FiniteMMP.step`):

1. take a minibatch of task indices (a :class:`~metaprox.tasks.taskset.TaskSampler`, or all tasks);
2. read their ``v_t`` from the store (never-seen tasks start at their center) and solve their prox problems
   from there (warm start, ``ProxProblem.init``) with the learner's inner solver — for a graph this is one
   Jacobi sweep with the neighbours fixed;
3. write the solutions back to the store;
4. update the center: ``"gradient"`` — the envelope gradient Σ_batch â_t ∂_c D_t(v_t, c) (Lemma 1) into
   ``.grad`` of the model parameters and a ``torch.optim`` step (the paper's rule); or
   ``"exact"`` — the minimiser of J over the centers with all v_t fixed (λ-weighted means; for a tree, one
   block-coordinate sweep over the nodes). Both are descent steps on J (minibatch gradients: in expectation),
   so J decreases to the joint optimum;
   or ``"fixed"`` — the center stays where it is (a given prior: with w = 0 every task is independent ridge).

Task weights in a minibatch: â_t = (w_t/W)/(B·p_t) (W = Σ_all w_t, B the batch length, p_t the per-draw
probability of task t: the sampler's ``probs`` for i.i.d. draws with probabilities, else 1/n — uniform i.i.d.,
shuffled epochs, explicit indices). Σ_batch â_t g_t is then an unbiased estimate of ∇(J/W), so the minibatch
iteration has J's minimiser as its fixed point in expectation (a decaying step or iterate averaging removes the
noise). The full batch gives â_t = w_t/W and unit weights â_t = 1/B, as before. (Normalising by the batch's own
weight sum, as earlier versions did, is a ratio estimator: with batches of 1 the weights vanish, with ``probs`` ∝ w
they count twice.)

Refused at construction (``ValueError``): ``center_update="exact"``, a :class:`~metaprox.priors.Tree` and a
:class:`~metaprox.priors.Graph` with a penalty other than squared ℓ2 (e.g. :class:`~metaprox.prox.RobustL2`) —
the exact center is a λ-weighted mean and the graph folds neighbours into one squared-ℓ2 center, so with another
penalty neither is a step on the reported J; use ``center_update="gradient"`` with RobustL2.

A new task (:meth:`FiniteMMP.adapt`): from its tree node's center with the task-level pull λ_g; under a node the
tree lacks (``node=None``: a new child of the root, or of ``parent``) from the parent's center with the new
node's center integrated out, 1/λ_eff = 1/λ_g + 1/λ_level (springs in series); without a tree from w with λ_g.

Parameter groups (``lam`` as ``{glob: λ | "shared" | "private"}``, :class:`~metaprox.prox.GroupL2`):
*shared* groups are tied to the center (the inner solver's gradient is masked there, so they never move) and
their meta-gradient is Σ_t â_t ∇L_t(v_t) — joint training; *private* groups (λ = 0) are trained per task and
never averaged into w.

On several torch.distributed ranks (``reducer.world_size > 1``) each rank owns a contiguous block of tasks and
its store shard (:mod:`metaprox.sharded`) and solves only its tasks of every batch (:meth:`FiniteMMP.step`).
Each rank sums â_t g_t over its own tasks of the batch (â_t from the global batch, so the sum over ranks needs
no normalising). Collectives per outer step: one all-reduce (the center gradient; exact center sums ride on it),
plus one halo all-reduce of the batch's neighbour rows for a graph; :meth:`FiniteMMP.objective` is one
all-reduce.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from metaprox.algorithms.base import MetaLearner, NonFiniteError, OptimizerSpec
from metaprox.composition import refuse
from metaprox.distributed import shard_bounds
from metaprox.execution import Oracle
from metaprox.losses import Loss, LossFn
from metaprox.priors import Graph, Tree, springs_in_series
from metaprox.prox import GroupL2, Penalty, SquaredL2, TaskScaled
from metaprox.solve import PerTask, solve_groups
from metaprox.solvers import InnerSolver
from metaprox.store import MemoryStore, ParamLayout, ShardedStore, TaskStore
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import GeneratedTaskSet, TaskSampler, TaskSet, estimator_weights, task_lam_factors

__all__ = ["FiniteMMP", "CENTER_UPDATES"]

Tensors = list[torch.Tensor]
CENTER_UPDATES = ("gradient", "exact", "fixed")


def _check_squared(prox: Penalty, center_update: str, prior: Tree | None, graph: Graph | None) -> None:
    """Refuse what is only right for a squared-ℓ2 pull: exact centers (λ-weighted means), a Tree (its exact
    sweep) and graph coupling (neighbours folded into one squared-ℓ2 center, squared edge terms in J). With
    another penalty (e.g. RobustL2) these would not be steps on the reported J."""
    if isinstance(getattr(prox, "base", prox), SquaredL2):
        return
    name = type(getattr(prox, "base", prox)).__name__
    needs = ("needs a squared-ℓ2 penalty (lam a number or {glob: λ | 'shared' | 'private'}: SquaredL2/GroupL2), "
             f"got {name}")
    if prior is not None:
        raise ValueError(f"a Tree prior (exact λ-weighted node means) {needs}; drop the prior to use {name}.")
    if center_update == "exact":
        raise ValueError(f"center_update='exact' (the λ-weighted mean of the task rows) {needs}; use "
                         f"center_update='gradient' (or 'fixed') with {name}.")
    if graph is not None:
        raise ValueError(f"graph coupling (neighbours folded into one squared-ℓ2 center, squared edge terms in "
                         f"the objective) {needs}; drop the graph to use {name}.")


class FiniteMMP(MetaLearner):
    """Meta-MinibatchProx over a finite :class:`TaskSet` with persistent, warm-started per-task parameters.

    Args:
        model: the model; its trainable parameters are the center w (the root of a tree prior).
        tasks: a :class:`TaskSet` or :class:`GeneratedTaskSet` (weights w_t come from it).
        loss: ``"mse"``, ``"cross_entropy"`` or a callable.
        lam: λ > 0, ``{glob: λ | "shared" | "private"}``, or a ready penalty (e.g. :class:`RobustL2`).
        task_lam: per-task pull: ``"constant"``, ``"size"`` (λ_t = λ·(n̄/n_t)^task_lam_power) or factors s_t.
        inner: inner solver (SGD default; ExactLeastSquares for linear mse models without shared groups).
        store: per-task parameter store (default: a :class:`MemoryStore` in the model's dtype).
        center_update: ``"gradient"`` (envelope gradient + optimizer, the paper's rule), ``"exact"`` or
            ``"fixed"`` (no center update: each task is a prox/ridge problem toward the given w).
        prior: a :class:`Tree` (needs ``center_update="exact"``). graph: a :class:`Graph` between tasks. Both,
            and ``"exact"``, need a squared-ℓ2 penalty (``lam`` a number or mapping; not ``RobustL2``).
        sampler: a :class:`TaskSampler` for :meth:`step` without indices (default: the full batch); its
            ``probs`` enter the task weights â_t (see the module doc).
        Others as in :class:`metaprox.MetaMinibatchProx` (default schedule: constant).

    Example:
        >>> import torch, metaprox
        >>> from metaprox.tasks.taskset import TaskSet
        >>> g = torch.Generator().manual_seed(0)
        >>> ts = TaskSet([metaprox.Task(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g))
        ...               for n in (5, 9, 20)])
        >>> fm = FiniteMMP(torch.nn.Linear(2, 1), ts, lam=1.0, task_lam="size",
        ...                inner=metaprox.ExactLeastSquares(), center_update="exact")
        >>> j0 = fm.objective(); _ = [fm.step() for _ in range(20)]; fm.objective() < j0
        True
    """

    supports_carried_moments = False  # its own step(): the running moments would never be updated
    supports_shared = True
    rule_name = "mmp"

    def __init__(self, model: nn.Module, tasks: TaskSet | GeneratedTaskSet, loss: str | LossFn | Loss = "mse",
                 lam: float | str | Mapping[str, float | str] | Penalty = 1.0, task_lam: Any = "constant",
                 task_lam_power: float = 1.0, inner: InnerSolver | None = None, store: TaskStore | None = None,
                 center_update: str = "gradient", prior: Tree | None = None, graph: Graph | None = None,
                 sampler: TaskSampler | None = None, meta_optimizer: OptimizerSpec = None, outer_lr: float = 1.0,
                 total_steps: int | None = None, schedule: str = "constant", execution: str = "auto",
                 seed: int = 0, stationarity_warn_ratio: float = 10.0):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        penalty = lam if isinstance(lam, Penalty) else GroupL2(lam, names)
        super().__init__(model, loss, penalty, inner, meta_optimizer, outer_lr, total_steps, schedule, execution,
                         seed, stationarity_warn_ratio)
        if center_update not in CENTER_UPDATES:
            raise ValueError(f"unknown center_update {center_update!r}; choose one of {CENTER_UPDATES}.")
        refuse(self, prior="tree" if prior is not None else "graph" if graph is not None else "flat",
               memory="sharded" if isinstance(store, ShardedStore) else
               "memory" if store is None or isinstance(store, MemoryStore) else "memmap")
        _check_squared(self.prox, center_update, prior, graph)  # what the matrix has no axis for: exact centers
        if prior is not None and center_update != "exact":
            raise ValueError("a Tree prior is updated by exact block-coordinate sweeps: use center_update='exact'.")
        self.tasks, self.center_update, self.prior, self.graph = tasks, center_update, prior, graph
        n = len(tasks)
        for what, obj in (("prior", prior), ("graph", graph)):
            size = None if obj is None else (len(obj.task_node) if isinstance(obj, Tree) else obj.n)
            if size is not None and size != n:
                raise ValueError(f"the {what} describes {size} tasks, the task set has {n}.")
        if prior is not None and not torch.allclose(prior.weights, tasks.weights.to(torch.float64)):
            raise ValueError("the Tree's task weights differ from the task set's (its node masses m_n come from "
                             "them): build it as Tree(parent, task_node, lam_levels, weights=tasks.weights).")
        params = self.fmodel.params()
        self.dtype, self.device = params[0].dtype, params[0].device
        self.layout = ParamLayout.of(self.names, params)
        self.store = store if store is not None else MemoryStore(self.layout, n, self.dtype)
        if self.store.layout != self.layout or self.store.num_tasks != n:
            raise ValueError("the store was made for other parameters or another number of tasks.")
        self.task_scale = task_lam_factors(tasks.sizes, task_lam, task_lam_power)
        self.sampler = sampler or TaskSampler(n)
        self.shared_groups = list(getattr(self.prox, "shared", [False] * len(self.names)))
        self.any_shared = any(self.shared_groups)
        entries = [torch.full((s,), float(lv)) for s, lv in zip(self.layout.sizes, self.prox.lams, strict=True)]
        self.lam_entries = torch.cat(entries).to(self.dtype)   # λ_g per flat entry (shared → 0)
        self.shared_entries = torch.cat([torch.full((s,), sh) for s, sh in zip(self.layout.sizes,
                                                                              self.shared_groups, strict=True)])
        if prior is not None:
            prior.bind(self.names, self.layout.sizes)  # its parameter groups (flat ones: one value at every node)
        self.theta = None if prior is None else self.w_row().expand(len(prior.nodes), -1).clone()

    def _refuse(self) -> None:
        """Checked in ``__init__`` with the prior and the store (the base would name memory 'none')."""

    # ----- rows ---------------------------------------------------------------------------------------
    def w_row(self) -> torch.Tensor:
        return self.layout.flatten([p.detach().unsqueeze(0) for p in self.fmodel.params()])[0]

    def centers(self, idx: np.ndarray) -> torch.Tensor:
        """Center rows ``(B, P)`` of tasks ``idx`` (w, or their tree node; shared entries always w)."""
        w = self.w_row()
        if self.theta is None:
            return w.expand(len(idx), -1).clone()
        c = self.prior.centers(self.theta, idx)  # type: ignore[union-attr]
        c[:, self.shared_entries] = w[self.shared_entries]
        return c

    def rows(self, idx: Any) -> torch.Tensor:
        """Current per-task rows of tasks ``idx`` (never-solved tasks read as their centers)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return self.store.read(idx, self.centers(idx))[0]

    def task_params(self, i: int) -> dict[str, torch.Tensor]:
        """The parameters v_t of task ``i`` (a name → tensor dict, for :meth:`predict`)."""
        v = self.layout.unflatten(self.rows([i]))
        return {n: t[0] for n, t in zip(self.names, v, strict=True)}

    def _oracle(self, x: torch.Tensor, y: torch.Tensor) -> Oracle:
        x = x.to(self.device, self.dtype)
        y = y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device)
        return self.execution.oracle(x, y)

    # ----- one outer step ---------------------------------------------------------------------------
    def step(self, tasks: Any = None, weights: Any = None, monitor: bool = True,
             where: Any = None) -> dict[str, float]:
        """One outer iteration on the task indices ``tasks`` (default: the next batch of the sampler);
        :meth:`MetaLearner.step`'s signature, as with a task memory (``weights`` and ``where`` must stay None:
        the weights are the estimator's, each task's center is its prior's).

        Each process solves the tasks of the batch it owns (one process: all; under torch.distributed, every
        rank passing the same global batch: :meth:`owned_range`, its store shard), and sums â_t g_t over them
        (â_t of :meth:`_estimator_weights` from the global batch, unbiased for ∇(J/W); explicit indices count as a
        uniform draw), one ``reducer.sum`` of ``[Σ_local â_t ∂_c D_t | exact center sums | non-finite flag |
        stationarity]`` (the exact sums of :meth:`_exact_sums_local` on several ranks only; a graph adds one
        halo all-reduce of the batch's neighbour rows before the solves, :meth:`_halo`). The rows are written
        only when no process saw a non-finite solution. The center moves in
        :meth:`~MetaLearner.apply_meta_gradient`, the one outer step: ``"gradient"`` — its optimizer step;
        ``"fixed"`` — none; ``"exact"`` — the optimizer steps the shared entries only (their data gradient;
        the others' gradient is 0), then, as the prior's own update, :meth:`_exact_centers` sets the rest to the
        minimiser of J over the centers (a block-coordinate solve, not an optimizer step)."""
        if weights is not None or where is not None:
            raise ValueError("FiniteMMP.step takes task indices only: the task weights come from its TaskSet and "
                             "sampler, and each task's center from its prior.")
        idx = self.sampler() if tasks is None else np.asarray(tasks, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            raise ValueError("empty batch of tasks.")
        sharded = self.reducer.world_size > 1
        lo, hi = self._check_sharded() if sharded else (0, len(self.tasks))
        own = (idx >= lo) & (idx < hi)
        local = idx[own]
        rows_of = self.rows  # a graph's neighbour rows: the store's, or on several ranks the batch's halo
        if sharded and self.graph is not None:
            rows_of = self._halo(np.unique(self.graph.neighbours(idx)[1]))
        grad, bad, stat_sum, v = torch.zeros_like(self.w_row()), 0.0, 0.0, None
        if len(local):
            c, s, v, data_grad, stat = self._solve_batch(local, rows_of, monitor)
            bad = float(not bool(torch.isfinite(v).all()))
            a = self._estimator_weights(idx, tasks is None)[torch.from_numpy(own)]
            grad = self._center_gradient(v, c, s, a, data_grad)  # this process's part of Σ_batch â_t g_t
            stat_sum = float(stat.sum())
        exact = self._exact_sums_local(local, v) if sharded and self.center_update == "exact" else []
        (grad, *exact), sums = self.reducer.sum([grad, *exact], {"nonfinite": bad, "stationarity": stat_sum})
        if sums["nonfinite"] > 0:
            raise NonFiniteError(f"non-finite task solution at outer step {self.step_count}; nothing was stored.")
        if v is not None:
            self.store.write(local, v)
        centers = (lambda factor: self._exact_centers(exact or None)) if self.center_update == "exact" else None
        diag = self.apply_meta_gradient([g[0] for g in self.layout.unflatten(grad.unsqueeze(0))],
                                        step_w=self.center_update != "fixed", also=centers)
        diag["tasks"] = float(len(idx))
        if monitor:
            diag["inner_stationarity"] = sums["stationarity"] / len(idx)
        return diag

    def _solve_batch(self, idx: np.ndarray, rows_of: Any, monitor: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Solve tasks ``idx`` warm-started from the store (a graph: one Jacobi sweep with the neighbours' rows
        from ``rows_of(ids)``): (centers c, pull factors s_t, rows v, data gradients, stationarity)."""
        c = self.centers(idx)
        init, _ = self.store.read(idx, c)
        init[:, self.shared_entries] = c[:, self.shared_entries]
        s = self.task_scale[idx].to(self.dtype)
        wt = self.tasks.weights[idx].to(self.dtype)
        if self.graph is not None:
            scale, c_eff = self.graph.coupled(idx, c, rows_of, s, wt)
            c_eff[:, self.shared_entries] = c[:, self.shared_entries]
        else:
            scale, c_eff = s, c
        v, data_grad, stat = self._solve_rows(self.tasks.groups(idx), scale, c_eff, init, monitor)
        return c, s, v, data_grad, stat

    def _estimator_weights(self, idx: np.ndarray, drawn: bool) -> torch.Tensor:
        """â_t of the batch ``idx`` (:func:`~metaprox.tasks.taskset.estimator_weights`: unbiased for ∇(J/W))."""
        return estimator_weights(self.tasks.weights.to(self.dtype), idx, self.sampler, drawn)

    def _solve_rows(self, groups: list, scale: torch.Tensor, c_eff: torch.Tensor, init: torch.Tensor,
                    monitor: bool, prox: Penalty | None = None, inner: InnerSolver | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Solve the prox problems of the rows of ``groups`` (``TaskSet.groups``: positions, x, y) warm-started
        at ``init``, with penalty ``prox`` (default the learner's) scaled by ``scale`` and solver ``inner``: rows
        v, data gradients on shared entries (or None), inner stationarity per task."""
        prox, inner = prox or self.prox, inner or self.inner
        v = torch.empty_like(init)
        data_grad = torch.zeros_like(init) if self.any_shared else None
        stat = torch.zeros(len(init), dtype=torch.float64)
        typed = ((torch.from_numpy(pos), x.to(self.device, self.dtype),
                  y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device))
                 for pos, x, y in groups)
        for s in solve_groups(self.execution, typed, inner, prox, PerTask(self.layout.unflatten(c_eff)),
                              init=PerTask(self.layout.unflatten(init)), scale=scale, shared=self.shared_groups,
                              generator=self.generator, monitor=monitor):
            p, res = s.indices, s.result
            v[p] = self.layout.flatten(res.params).to(v.dtype)
            if data_grad is not None:
                data_grad[p] = self.layout.flatten(s.oracle(res.params)[1]).to(v.dtype)
            if monitor and res.stationarity is not None:
                stat[p] = res.stationarity.double().cpu()
        return v, data_grad, stat

    # ----- torch.distributed: tasks partitioned across ranks --------------------------------------------
    def owned_range(self) -> tuple[int, int]:
        """The tasks ``[lo, hi)`` this rank owns: contiguous blocks of ids (``shard_bounds(n, world, rank)``)."""
        return shard_bounds(len(self.tasks), self.reducer.world_size, self.reducer.rank)

    def _check_sharded(self) -> tuple[int, int]:
        lo, hi = self.owned_range()
        if getattr(self.inner, "batch_size", None):
            raise ValueError("FiniteMMP on several ranks needs full-batch inner solves (inner minibatch draws "
                             "would depend on the split).")
        store = self.store
        if not isinstance(store, ShardedStore) or (store.lo, store.hi) != (lo, hi):
            raise ValueError(f"FiniteMMP on rank {self.reducer.rank} of {self.reducer.world_size} needs this rank's "
                             f"shard of the store, tasks [{lo}, {hi}) (metaprox.sharded.open_shard).")
        return lo, hi

    def _halo(self, ids: np.ndarray) -> Any:
        """``rows_of`` for the sorted task ids ``ids`` owned by any rank (a collective): each rank writes the
        current rows it owns into a zero ``(len(ids), P)`` buffer, one all-reduce (a sum with one non-zero term
        per row: exact) gives every rank every row. Read before any rank writes, as in a single process."""
        if len(ids) == 0:  # every rank knows the batch and the graph, so all skip together
            return lambda q: torch.zeros(len(q), self.layout.numel, dtype=self.dtype)
        (buf,), _ = self.reducer.sum([self._owned_rows_or_zero(ids, self.dtype)], {})
        return lambda q: buf[torch.from_numpy(np.searchsorted(ids, q))]

    def _owned_rows_or_zero(self, ids: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``(len(ids), P)`` of tasks ``ids``: this rank's current rows where it owns the task, else zeros
        (summed over the ranks, every row has exactly one non-zero term)."""
        lo, hi = self.owned_range()
        buf = torch.zeros(len(ids), self.layout.numel, dtype=dtype)
        mine = (ids >= lo) & (ids < hi)
        if mine.any():
            buf[torch.from_numpy(mine)] = self.rows(ids[mine]).to(dtype)
        return buf

    def _pull_factors(self) -> torch.Tensor:
        """w_t·s_t of every task (its pull toward its center is this times λ_g per entry)."""
        return self.tasks.weights.to(self.dtype) * self.task_scale.to(self.dtype)

    def _center_rows(self) -> int:
        return 1 if self.theta is None else len(self.theta)

    def _node_of(self, ids: np.ndarray) -> torch.Tensor:
        """The center row of each task: its tree node, or 0 (the one flat center)."""
        if self.prior is None:
            return torch.zeros(len(ids), dtype=torch.int64)
        return torch.from_numpy(self.prior.task_node[ids])

    def _exact_sums_local(self, local: np.ndarray, v: torch.Tensor | None, chunk: int = 4096) -> Tensors:
        """This rank's part of the exact center update, over every task it owns (the batch rows ``local`` taken
        from ``v``, not yet stored, rounded as the store will keep them): ``[Σ_solved w_t s_t λ_g v_t,
        Σ_never-solved w_t s_t]`` per center row (``(K, P)`` and ``(K,)``; K = 1 flat, the tree's nodes).
        Never-solved tasks read as their center, which the update only knows after the optimizer step, so they
        travel as a weight (see :meth:`_exact_centers`)."""
        lo, hi = self.owned_range()
        num = torch.zeros(self._center_rows(), self.layout.numel, dtype=self.dtype)
        unseen = torch.zeros(self._center_rows(), dtype=self.dtype)
        q = self._pull_factors()
        zero = torch.zeros(self.layout.numel, dtype=self.dtype)
        for start in range(lo, hi, chunk):
            ids = np.arange(start, min(hi, start + chunk))
            rows, seen = self.store.read(ids, zero)
            here = (local >= start) & (local < start + len(ids))
            if v is not None and here.any():
                pos = torch.from_numpy(local[here] - start)
                stored = v[torch.from_numpy(here)].to(self.store.dtype or self.dtype)
                rows[pos], seen[pos] = stored.to(self.dtype), True
            qs, node = q[ids], self._node_of(ids)
            num.index_add_(0, node, (qs * seen).unsqueeze(1) * self.lam_entries * rows)
            unseen.index_add_(0, node, qs * ~seen)
        return [num, unseen]

    def _center_gradient(self, v: torch.Tensor, c: torch.Tensor, s: torch.Tensor, a: torch.Tensor,
                         data_grad: torch.Tensor | None) -> torch.Tensor:
        """Σ_t â_t ∂_c D_t(v_t, c) (+ Σ_t â_t ∇L_t(v_t) on shared entries): the envelope gradient in w."""
        if self.theta is not None or self.center_update == "exact":
            g = torch.zeros_like(c[0])
        else:
            pen = TaskScaled(self.prox, s)
            gc = self.layout.flatten(pen.grad_c(self.layout.unflatten(v), self.layout.unflatten(c)))
            g = a @ gc
        if data_grad is not None:
            g = torch.where(self.shared_entries, a @ data_grad, g)
        return g

    def _exact_centers(self, sums: Tensors | None = None) -> None:
        """Minimise J over the centers with every v_t fixed: from all tasks' rows in the store (one process), or
        from the all-reduced ``sums`` of :meth:`_exact_sums_local` (several ranks; same minimiser, other
        round-off): num = Σ_solved pull·v + (Σ_never-solved w_t s_t)·λ_g·c, den = (Σ_all w_t s_t)·λ_g."""
        w = self.w_row()
        if self.theta is not None:
            self.theta[:, self.shared_entries] = w[self.shared_entries]
        if sums is None:
            rows = self.rows(np.arange(len(self.tasks)))
            pull = self._pull_factors().unsqueeze(1) * self.lam_entries
            if self.theta is not None:
                num, den = self.prior.task_sums(rows, pull)  # type: ignore[union-attr]
            else:
                num, den = (pull * rows).sum(0, keepdim=True), pull.sum(0, keepdim=True)
        else:
            solved, unseen = sums
            center = w.unsqueeze(0) if self.theta is None else self.theta
            num = solved + unseen.unsqueeze(1) * self.lam_entries * center
            mass = torch.zeros(self._center_rows(), dtype=self.dtype).index_add_(
                0, self._node_of(np.arange(len(self.tasks))), self._pull_factors())
            den = mass.unsqueeze(1) * self.lam_entries
        if self.theta is not None:
            self.theta = self.prior.update_nodes_from_sums(self.theta, num, den)  # type: ignore[union-attr]
            new = self.theta[self.prior.index[self.prior.root]]  # type: ignore[union-attr]
        else:
            new = torch.where(den[0] > 0, num[0] / den[0].clamp_min(1e-300), w)
        new = torch.where(self.shared_entries | (self.lam_entries == 0), w, new)
        with torch.no_grad():
            for p, t in zip(self.fmodel.params(), self.layout.unflatten(new.unsqueeze(0)), strict=True):
                p.copy_(t[0])

    # ----- the joint objective ---------------------------------------------------------------------------
    def objective(self, chunk: int = 4096) -> float:
        """The exact joint objective J = Σ_t w_t [L_t(v_t) + s_t·D(v_t, c_t)] (+ graph and tree terms)."""
        n = len(self.tasks)
        total = 0.0
        lo, hi = (0, n) if self.reducer.world_size == 1 else self._check_sharded()
        for start in range(lo, hi, chunk):
            idx = np.arange(start, min(hi, start + chunk))
            c = self.centers(idx)
            v = self.store.read(idx, c)[0]
            v[:, self.shared_entries] = c[:, self.shared_entries]
            pen = TaskScaled(self.prox, self.task_scale[idx]).value(self.layout.unflatten(v),
                                                                  self.layout.unflatten(c))
            for pos, x, y in self.tasks.groups(idx):
                p = torch.from_numpy(pos)
                losses = self._oracle(x, y)(self.layout.unflatten(v[p]))[0]
                total += float((self.tasks.weights[idx][p] * (losses.double().cpu() + pen[p].double().cpu())).sum())
        if self.reducer.world_size > 1:  # a collective: every rank calls objective()
            total = self._objective_sharded(total)
        elif self.graph is not None:
            total += self.graph.penalty(self.rows(np.arange(n)), self.lam_entries)
        if self.prior is not None and self.theta is not None:
            total += self.prior.penalty(self.theta)
        return total

    def _objective_sharded(self, local: float) -> float:
        """Σ over ranks of the local task terms, plus the graph penalty: one all-reduce that also carries the
        rows of every edge endpoint (each rank fills the ones it owns; O(|endpoints|·P) floats, in float64 so
        J keeps its precision), from which every rank computes the same penalty."""
        if self.graph is None:
            return self.reducer.sum([], {"J": local})[1]["J"]
        ends = self.graph.endpoints()
        (rows,), sums = self.reducer.sum([self._owned_rows_or_zero(ends, torch.float64)], {"J": local})
        return sums["J"] + self.graph.penalty(rows.to(self.dtype), self.lam_entries, ends)

    # ----- state: the tree's node centers θ travel with the checkpoint ---------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.theta is not None:
            state["buffers"] = {"tree_theta": self.theta.clone()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        theta = (state.get("buffers") or {}).get("tree_theta")
        if (theta is None) != (self.theta is None):
            state_has = "has no" if theta is None else "has"
            mine = "a" if self.theta is not None else "no"
            raise ValueError(f"the state {state_has} tree node centers but this FiniteMMP has {mine} Tree prior; "
                             f"load it into a learner built with the same prior.")
        if theta is not None and theta.shape != self.theta.shape:  # type: ignore[union-attr]
            raise ValueError(f"tree node centers of shape {tuple(theta.shape)} in the state, "
                             f"{tuple(self.theta.shape)} in this learner (another tree or model).")  # type: ignore
        super().load_state_dict(state)
        if theta is not None:
            self.theta = theta.to(self.dtype).clone()

    def predict_task(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Model output of task ``i`` (its stored v_t) on inputs ``x``."""
        with torch.no_grad():
            return self.predict(self.task_params(i), x.to(self.device, self.dtype))

    # ----- a new task, adapted from the prior ----------------------------------------------------------------
    def adapt(self, task: Task, steps: int | None = None, lam: float | None = None,
              inner: InnerSolver | None = None, where: str | None = None, *, node: str | None = None,
              parent: str | None = None) -> dict[str, torch.Tensor]:
        """Parameters of a new ``task`` (not one of the task set): its prox problem solved from the prior.

        With a :class:`Tree` prior, a task of a known ``node`` is solved from θ_node with the task-level pull
        λ_g (per group, as the penalty says; s = 1). ``node=None`` stands for a new node under ``parent``
        (default: the root, w): the task is solved from θ_parent with the new node's center integrated out —
        per entry 1/λ_eff = 1/λ_g + 1/λ_depth (:func:`springs_in_series`), so v is exactly the minimiser over v
        and that center of J's two terms for the task (θ fixed). A ``node`` the tree does not have is an error
        (a typo must not silently adapt from the root). Without a prior: from w with λ_g, or with ``lam`` for
        every non-shared group. Shared groups stay at w, private ones are free. ``steps``/``inner`` override the
        inner solver; ``where`` is ``node`` (:meth:`MetaLearner.adapt`'s name for a task's place; give one of them),
        ``node``/``parent`` are keyword-only, the positional order is :meth:`MetaLearner.adapt`'s."""
        if where is not None:
            if node is not None:
                raise ValueError("give the task's node as where= or node=, not both.")
            node = where
        return self._first(self.adapt_tasks([task], steps, lam, inner, where=(node, parent)))

    def test_prior(self, tasks: Any, lam: float | None = None, where: Any = None) -> tuple[Tensors, Penalty, None]:
        """(center, penalty) of new tasks (:meth:`adapt`); ``where = (node, parent)``, the same for all tasks."""
        node, parent = (None, None) if where is None else where
        w, prox = self.w_row(), self.prox
        if self.prior is None or self.theta is None:
            if node is not None or parent is not None:
                raise ValueError(f"adapt(node={node!r}, parent={parent!r}) needs a Tree prior, and this FiniteMMP "
                                 f"has none: call adapt(task) (adapted from w).")
            center = w
            if lam is not None:
                prox = GroupL2({glob.escape(n): "shared" if sh else float(lam)
                                for n, sh in zip(self.names, self.shared_groups, strict=True)}, self.names)
        elif lam is not None:
            raise ValueError("lam= overrides the pull of a flat prior; with a Tree prior the pulls come from the "
                             "penalty and the tree's lam_levels (build the learner with the λ you want).")
        elif node is not None:
            if node not in self.prior.index:
                raise ValueError(f"node {node!r} is not in the tree (nodes: {self.prior.nodes[:8]}"
                                 f"{' …' if len(self.prior.nodes) > 8 else ''}); for a task of a new group pass "
                                 f"node=None and parent=<its parent> (default: the root).")
            if parent is not None:
                raise ValueError(f"node {node!r} is in the tree (its parent is {self.prior.parent[node]!r}); "
                                 f"parent= is only for a new node (node=None).")
            center = self.theta[self.prior.index[node]]
        else:
            center, prox = self._new_node_prior(parent)
        center = torch.where(self.shared_entries, w, center)
        return [t[0] for t in self.layout.unflatten(center.unsqueeze(0))], prox, None

    def _new_node_prior(self, parent: str | None) -> tuple[torch.Tensor, Penalty]:
        """(θ_parent, the marginal penalty) of a task under a new child of ``parent`` (default: the root)."""
        tree, theta = self.prior, self.theta
        assert tree is not None and theta is not None
        up = tree.root if parent is None else parent
        if up not in tree.index:
            raise ValueError(f"parent {up!r} is not a node of the tree; give a known node (or None: the root).")
        depth = tree.depth[up] + 1
        if depth > len(tree.lam_levels):
            raise ValueError(f"a new node under {up!r} sits at depth {depth}, but the tree's lam_levels has a λ for "
                             f"depths 1..{len(tree.lam_levels)}: build the Tree with one λ per depth down to "
                             f"{depth}, or adapt from a higher parent.")
        level = tree.lam_levels[depth - 1]
        follows = tree.follows or {}  # a flat group has no new node to integrate out: it keeps λ_g
        lams = {glob.escape(n): "shared" if sh else springs_in_series(lam, level) if follows.get(n, True) else lam
                for n, lam, sh in zip(self.names, self.prox.lams, self.shared_groups, strict=True)}
        return theta[tree.index[up]], GroupL2(lams, self.names)

    def commit(self, extra: dict[str, Any] | None = None) -> None:
        """Make the store durable (a :class:`~metaprox.store.MemmapStore` records step and ``extra``)."""
        self.store.commit({"step": self.step_count, **(extra or {})})
