"""MMP with a prox-coupled trunk and task-private heads/encoders of *different shapes* in one meta-batch.

Tasks come in *kinds* (e.g. ``"5way"``, ``"20way"``, or one kind per regression target); every kind has its own
head (and optionally input encoder) in a :class:`~metaprox.models.shared_trunk.SharedTrunk`. A task's parameters
are ``v_t = (trunk_t, private_t)``; its prox problem is

    min_{trunk_t, private_t}  L_t(head_t ∘ trunk_t ∘ encoder_t) + Σ_g λ_g/2 ‖trunk_{t,g} − w_g‖²
                              (+ μ/2 ‖private_t − private⁰_kind‖², μ = ``head_lam``, default 0)

The trunk part is pulled toward the center w (the trunk module's parameters) — per trunk group λ > 0,
``"shared"`` (λ = ∞, joint training: kept at w by the solver, meta-gradient = the data gradient) or
``"private"``; heads and encoders are private (never averaged into w; with μ > 0 they are ridge-regularised
toward their fixed start ``private⁰``). The meta-gradient of w is the usual envelope gradient (Lemma 1)
``Σ_t â_t λ(w − trunk_t*)`` (infinite setting: â normalised over the whole meta-batch; finite setting: the
unbiased minibatch weights of :func:`~metaprox.tasks.taskset.estimator_weights`), whatever the head shapes:
the head shape only changes the inner problem. Tasks are grouped by (kind, data shape) and each group is solved
batched by the ordinary inner solvers on the kind's ``encoder → trunk → head`` member model.

Two settings:

- :class:`MultiHeadMMP` — infinite tasks (every task is new): the private part of a task starts at
  ``private⁰`` each time (``head_init="zero"``: zero heads, the natural choice when labels are permuted per
  episode; ``"module"``: the head modules' own initial values, fixed — λ = 0 means they are never learned)
  and is discarded after the step; :meth:`MultiHeadMMP.adapt` solves a new task's problem from the center.
- :class:`FiniteMultiHeadMMP` — a finite :class:`~metaprox.tasks.taskset.TaskSet` with one kind per task:
  every task's full row (trunk and private part, its own shape) persists in a per-kind store keyed by the task
  index and is warm-started; :meth:`FiniteMultiHeadMMP.objective` is the exact joint objective
  ``Σ_t w_t [L_t(v_t) + D_t(v_t, w)]``. With ``outer_lr = 1/λ`` and the full batch, the outer step sets w to
  the (weighted) mean of the trunk rows: block-coordinate descent on the joint objective.

Caveat (scale degeneracy): if the trunk is positively homogeneous (linear, or ReLU without saturation) and the
heads are private, the joint objective has no minimiser — scaling every trunk and w by a and every head by 1/a
keeps every fit, Σ‖trunk_t − w‖² stays 0 when the trunks agree, and a head ridge shrinks like 1/a². The
infimum is then the hard-shared trunk at infinity; in practice finite inner/outer steps from a bounded start
keep the iterates bounded, but a *converged* joint optimum needs a trunk that saturates (tanh) plus μ > 0
(see tests/algorithms/test_multihead.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metaprox.algorithms.base import MetaLearner, NonFiniteError, OptimizerSpec
from metaprox.execution import Execution, FunctionalModel
from metaprox.losses import Loss, LossFn
from metaprox.models.shared_trunk import SharedTrunk
from metaprox.prox import GroupL2, TaskScaled
from metaprox.solve import PerTask, SolvedGroup, solve_groups, stacked
from metaprox.solvers import InnerSolver
from metaprox.store import MemoryStore, ParamLayout, TaskStore
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSampler, TaskSet, estimator_weights, task_lam_factors

__all__ = ["MultiHeadMMP", "FiniteMultiHeadMMP", "HEAD_INITS"]

Tensors = list[torch.Tensor]
HEAD_INITS = ("zero", "module")


@dataclass
class _Kind:
    """One task kind: its member model, execution, penalty, and where the trunk sits among its parameters."""

    name: str
    fmodel: FunctionalModel
    execution: Execution
    names: list[str]
    layout: ParamLayout
    prox: GroupL2
    trunk_pos: list[int]     # member positions of the trunk parameters, in the learner's (trunk) name order
    private_init: dict[int, torch.Tensor]  # member position → fixed start/center of a private tensor


class MultiHeadMMP(MetaLearner):
    """Infinite-task MMP around a shared trunk with per-kind private heads/encoders (see module doc).

    Args:
        model: a :class:`SharedTrunk`; its trunk parameters are the meta-parameters w.
        loss: ``"mse"``, ``"cross_entropy"`` or a callable (the same for all kinds).
        lam: pull of the trunk: λ > 0 or ``{glob over trunk parameter names: λ | "shared" | "private"}``.
        head_lam: ridge μ ≥ 0 of heads/encoders toward their fixed start (0 = purely private).
        head_init: ``"zero"`` (heads start at 0; encoders always start at their module values) or ``"module"``.
        Others as in :class:`metaprox.MetaMinibatchProx` (default schedule: constant).
    """

    supports_carried_moments = False  # the running moments are the trunk's only; heads have none to carry
    supports_shared = True
    places = "kind"  # step(tasks, where=kinds) / adapt(task, where=kind): which head each task uses
    prox: GroupL2  # the trunk's penalty, built as a GroupL2 in __init__

    def __init__(self, model: SharedTrunk, loss: str | LossFn | Loss = "cross_entropy",
                 lam: float | str | Mapping[str, float | str] = 1.0, head_lam: float = 0.0,
                 head_init: str = "zero", inner: InnerSolver | None = None, meta_optimizer: OptimizerSpec = None,
                 outer_lr: float = 1.0, total_steps: int | None = None, schedule: str = "constant",
                 execution: str = "auto", seed: int = 0, stationarity_warn_ratio: float = 10.0):
        if not isinstance(model, SharedTrunk):
            raise TypeError(f"model must be a metaprox SharedTrunk, got {type(model).__name__}.")
        if head_init not in HEAD_INITS:
            raise ValueError(f"unknown head_init {head_init!r}; choose one of {HEAD_INITS}.")
        if not (head_lam >= 0 and math.isfinite(head_lam)):
            raise ValueError(f"head_lam = {head_lam}: must be a finite number ≥ 0.")
        trunk_names = [n for n, p in model.trunk.named_parameters() if p.requires_grad]
        penalty = GroupL2(lam, trunk_names)
        super().__init__(model.trunk, loss, penalty, inner, meta_optimizer, outer_lr, total_steps, schedule,
                         execution, seed, stationarity_warn_ratio)
        self.shared_model, self.head_lam, self.head_init = model, float(head_lam), head_init
        self._strategy = execution
        self.kinds: dict[str, _Kind] = {}
        for k in model.kinds:
            self.kinds[k] = self._make_kind(k)

    def _make_kind(self, kind: str) -> _Kind:
        member = self.shared_model.member(kind)
        fm = FunctionalModel(member)
        pos = {n: i for i, n in enumerate(fm.names)}
        missing = [n for n in self.names if "trunk." + n not in pos]
        if missing:
            raise ValueError(f"kind {kind!r}: trunk parameters {missing} are frozen in the member model.")
        trunk_pos = [pos["trunk." + n] for n in self.names]
        lams: dict[str, float | str] = {"trunk." + n: gl
                                        for n, gl in zip(self.names, self.prox.group_lams, strict=True)}
        lams["*"] = self.head_lam
        prox = GroupL2(lams, fm.names)
        params = fm.params()
        tp = set(trunk_pos)
        private_init = {}
        for i, (n, p) in enumerate(zip(fm.names, params, strict=True)):
            if i in tp:
                continue
            zero = self.head_init == "zero" and n.startswith("head.")
            private_init[i] = torch.zeros_like(p.detach()) if zero else p.detach().clone()
        return _Kind(kind, fm, Execution(fm, self.loss, self._strategy), fm.names, ParamLayout.of(fm.names, params),
                     prox, trunk_pos, private_init)

    def _kind(self, kind: str) -> _Kind:
        if kind not in self.kinds:
            raise KeyError(f"unknown task kind {kind!r}; the model has heads for {list(self.kinds)}.")
        return self.kinds[kind]

    # ----- centers and solves -----------------------------------------------------------------------
    def kind_center(self, kind: str) -> Tensors:
        """The center of ``kind``'s member parameters: trunk entries = w, private entries = their start."""
        k = self._kind(kind)
        w = self.center()
        out: list[torch.Tensor | None] = [None] * len(k.names)
        for j, i in enumerate(k.trunk_pos):
            out[i] = w[j]
        for i, t in k.private_init.items():
            out[i] = t
        return out  # type: ignore[return-value]

    def _solve_kind(self, k: _Kind, groups: Any, init: Tensors | None, scale: torch.Tensor | None,
                    monitor: bool, inner: InnerSolver | None = None, on_group: Any = None,
                    keys: torch.Tensor | None = None) -> list[SolvedGroup]:
        """Solve groups of tasks of kind ``k`` (the one solve loop, on the kind's member model); ``init``,
        ``scale`` and ``keys`` run over the tasks of ``groups`` (a :class:`PerTask` stack, pull factors, the
        step's inner-minibatch uniforms)."""
        c = self.kind_center(k.name)
        if init is not None and k.prox.any_shared:  # shared groups always start (and stay) at the center
            init = PerTask(ci.expand_as(t).clone() if sh else t
                           for ci, t, sh in zip(c, init, k.prox.shared, strict=True))
        return solve_groups(k.execution, groups, inner or self.inner, k.prox, c, init=init, scale=scale,
                            shared=k.prox.shared, keys=keys, generator=self.generator, monitor=monitor,
                            on_group=on_group)

    def _trunk_grad(self, k: _Kind, solved: SolvedGroup, a: torch.Tensor) -> Tensors:
        """Σ_t a_t g_t over one group: λ_g s_t (w − trunk_t) on pulled groups, ∇L_t on shared ones."""
        res, pen = solved.result, solved.penalty
        assert pen is not None and solved.center is not None
        gc = pen.grad_c(res.params, solved.center)
        data = solved.oracle(res.params)[1] if k.prox.any_shared else None
        out = []
        for i in k.trunk_pos:
            g = data[i] if (data is not None and k.prox.shared[i]) else gc[i]
            out.append(torch.tensordot(a.to(g.dtype), g, dims=1))
        return out

    def _by_kind_positions(self, kinds: Sequence[str]) -> dict[str, list[int]]:
        by: dict[str, list[int]] = {}
        for i, kd in enumerate(kinds):
            by.setdefault(str(kd), []).append(i)
        return by

    # ----- one outer step (infinite setting): MetaLearner.step with this solve --------------------------------
    def solve_and_meta_gradient(self, tasks: Sequence[Task], center: Tensors, weights: torch.Tensor,
                                monitor: bool, init: Tensors | None = None, scale: torch.Tensor | None = None,
                                where: Sequence[Any] | None = None) -> tuple[list[SolvedGroup], Tensors]:
        """:meth:`MetaLearner.step`'s inner solves and ``Σ_t a_t g_t`` of the trunk, per kind (``where``): each
        kind's tasks on its member model, centred at (w, the private start); new tasks, so no ``init``."""
        assert where is not None and init is None and scale is None
        total = [torch.zeros_like(p) for p in center]
        solved = []
        for kd, pos in self._by_kind_positions(where).items():
            k = self._kind(kd)
            keys = None if self._step_keys is None else self._step_keys[pos]
            for sg in self._solve_kind(k, stacked(k.execution, [tasks[i] for i in pos]), None, None, monitor,
                                       keys=keys):
                torch._foreach_add_(total, self._trunk_grad(k, sg, weights[[pos[j] for j in sg.indices]]))
                solved.append(sg)
        return solved, total

    def _first(self, solved: list[SolvedGroup], where: Any = None) -> dict[str, torch.Tensor]:
        """:meth:`adapt`'s result: the kind's member-named parameters (trunk and private part)."""
        return {n: t[0] for n, t in zip(self._kind(where).names, solved[0].result.params, strict=True)}

    def adapt_tasks(self, tasks: Sequence[Task], steps: int | None = None, lam: float | None = None,
                    inner: InnerSolver | None = None, where: Any = None, on_group: Any = None) -> list[SolvedGroup]:
        """The test-time path (:meth:`MetaLearner.adapt_tasks`) per kind: ``where`` gives each task's kind; the
        groups' ``indices`` are positions in ``tasks``."""
        if lam is not None:
            raise ValueError("lam= is not supported by the multi-head learners (build them with the λ you want).")
        if where is None or len(where) != len(tasks):
            raise ValueError("give one kind per task (where=[kind, ...]).")
        solver = inner or self.inner
        if steps is not None:
            solver = solver.with_steps(steps)
        out = []
        for kd, pos in self._by_kind_positions(where).items():
            k = self._kind(kd)
            for sg in self._solve_kind(k, stacked(k.execution, [tasks[i] for i in pos]), None, None, False,
                                       inner=solver, on_group=on_group):
                sg.indices = [pos[j] for j in sg.indices]
                out.append(sg)
        return out

    def predict(self, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                kind: str | None = None) -> torch.Tensor:
        """Output of ``kind``'s member with ``params`` (from :meth:`adapt`); kind inferred if unambiguous."""
        if kind is None:
            fits = [kd for kd, k in self.kinds.items() if set(k.names) == set(params)
                    and all(params[n].shape == s for n, s in zip(k.names, k.layout.shapes, strict=True))]
            if len(fits) != 1:
                raise ValueError("cannot infer the task kind from the parameters; pass kind=.")
            kind = fits[0]
        with torch.no_grad():
            return self._kind(kind).fmodel.single(dict(params), x)


class FiniteMultiHeadMMP(MultiHeadMMP):
    """Finite-task MMP around a shared trunk: per-task rows of *different shapes* (by kind), persisted and
    warm-started (see module doc).

    Args:
        model: a :class:`SharedTrunk`. tasks: a :class:`TaskSet`. kinds: the kind of every task (len(tasks)).
        task_lam: per-task pull factors s_t (``"constant"``, ``"size"`` or numbers; λ_t = s_t·λ).
        stores: kind → :class:`~metaprox.store.TaskStore` with one row per task of that kind (default: in memory).
        sampler: a :class:`TaskSampler` over the task set (default: the full batch).
        Others as in :class:`MultiHeadMMP`.
    """

    def __init__(self, model: SharedTrunk, tasks: TaskSet, kinds: Sequence[str],
                 loss: str | LossFn | Loss = "cross_entropy", lam: float | str | Mapping[str, float | str] = 1.0,
                 head_lam: float = 0.0, head_init: str = "zero", task_lam: Any = "constant",
                 task_lam_power: float = 1.0, inner: InnerSolver | None = None,
                 stores: Mapping[str, TaskStore] | None = None, sampler: TaskSampler | None = None, **kwargs: Any):
        super().__init__(model, loss, lam, head_lam, head_init, inner, **kwargs)
        kinds = [str(k) for k in kinds]
        if len(kinds) != len(tasks):
            raise ValueError(f"got {len(kinds)} kinds for {len(tasks)} tasks.")
        for kd in set(kinds):
            self._kind(kd)
        self.tasks, self.task_kinds = tasks, np.asarray(kinds)
        self.row = np.zeros(len(tasks), dtype=np.int64)   # task index → row in its kind's store
        counts: dict[str, int] = {}
        for t, kd in enumerate(kinds):
            self.row[t] = counts.get(kd, 0)
            counts[kd] = self.row[t] + 1
        dtype = self.center()[0].dtype
        self.stores: dict[str, TaskStore] = {}
        for kd, cnt in counts.items():
            st = (stores or {}).get(kd) or MemoryStore(self.kinds[kd].layout, cnt, dtype)
            if st.layout != self.kinds[kd].layout or st.num_tasks != cnt:
                raise ValueError(f"the store of kind {kd!r} was made for other parameters or another number "
                                 f"of tasks ({cnt} expected).")
            self.stores[kd] = st
        self.task_scale = task_lam_factors(tasks.sizes, task_lam, task_lam_power)
        self.sampler = sampler or TaskSampler(len(tasks))

    def _center_row(self, kind: str) -> torch.Tensor:
        k = self.kinds[kind]
        return k.layout.flatten([t.detach().unsqueeze(0) for t in self.kind_center(kind)])[0]

    def _by_kind(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        by = self._by_kind_positions(self.task_kinds[idx].tolist())
        return {kd: np.asarray(p, dtype=np.int64) for kd, p in by.items()}

    def task_params(self, i: int) -> dict[str, torch.Tensor]:
        """The stored parameters v_t of task ``i`` (member names; never-solved tasks read as the center)."""
        kd = str(self.task_kinds[i])
        k = self.kinds[kd]
        rows = self.stores[kd].read(self.row[[i]], self._center_row(kd))[0]
        return {n: t[0] for n, t in zip(k.names, k.layout.unflatten(rows), strict=True)}

    def predict_task(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.predict(self.task_params(i), x, str(self.task_kinds[i]))

    def step(self, tasks: Any = None, weights: Any = None, monitor: bool = True,
             where: Any = None) -> dict[str, float]:
        """One outer step on the task indices ``tasks`` (default: the sampler's next batch), kinds mixed;
        :meth:`MetaLearner.step`'s signature, as for :class:`FiniteMMP` (the weights are the estimator's, the
        kinds the task set's: ``weights`` and ``where`` must stay None)."""
        if weights is not None or where is not None:
            raise ValueError("a finite multi-head set has its own task weights (TaskSet, sampler) and kinds (given "
                             "at construction): step(indices) takes no weights= or where=.")
        indices = tasks
        idx = self.sampler() if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            raise ValueError("empty batch of tasks.")
        # unbiased for the weighted joint objective (a batch-sum ratio is biased with minibatches)
        wt = estimator_weights(self.tasks.weights.to(torch.float64), idx, self.sampler, drawn=indices is None)
        total = [torch.zeros_like(p) for p in self.center()]
        done = []
        for kd, kpos in self._by_kind(idx).items():
            k, store = self.kinds[kd], self.stores[kd]
            kidx = idx[kpos]
            init_rows = store.read(self.row[kidx], self._center_row(kd))[0]
            solved = torch.empty_like(init_rows)
            dtype = init_rows.dtype
            groups = ((torch.from_numpy(gpos), x.to(dtype), y.to(dtype) if y.is_floating_point() else y)
                      for gpos, x, y in self.tasks.groups(kidx))
            for sg in self._solve_kind(k, groups, PerTask(k.layout.unflatten(init_rows)),
                                       self.task_scale[kidx].to(dtype), monitor):
                p = sg.indices
                torch._foreach_add_(total, self._trunk_grad(k, sg, wt[kpos[p.numpy()]]))
                solved[p] = k.layout.flatten(sg.result.params).to(dtype)
                done.append(sg)
            if not bool(torch.isfinite(solved).all()):
                raise NonFiniteError(f"non-finite task solution at outer step {self.step_count}.")
            store.write(self.row[kidx], solved)
        # â_t are the unbiased estimator's: no normalising by the batch; monitors against each kind's center
        # (heads included: ‖v − c‖² counts their distance from their start)
        diag = self.apply_meta_gradient(total)
        diag["tasks"] = float(len(idx))
        if monitor:
            diag.update(self.monitors(self.monitor_sums(done)))
        return diag

    def objective(self) -> float:
        """J = Σ_t w_t [L_t(v_t) + s_t·D(v_t, c)] over all tasks, from the stored rows (no updates)."""
        idx = np.arange(len(self.tasks))
        total = 0.0
        for kd, kpos in self._by_kind(idx).items():
            k = self.kinds[kd]
            kidx = idx[kpos]
            rows = self.stores[kd].read(self.row[kidx], self._center_row(kd))[0]
            c = self.kind_center(kd)
            for gpos, x, y in self.tasks.groups(kidx):
                v = k.layout.unflatten(rows[torch.from_numpy(gpos)])
                x = x.to(rows.dtype)
                y = y.to(rows.dtype) if y.is_floating_point() else y
                losses = k.execution.oracle(x, y)(v)[0].double()
                pen = TaskScaled(k.prox, self.task_scale[kidx[gpos]]).value(v, c).double()
                total += float((self.tasks.weights[kidx[gpos]] * (losses + pen)).sum())
        return total

    def commit(self, extra: dict[str, Any] | None = None) -> None:
        for st in self.stores.values():
            st.commit({"step": self.step_count, **(extra or {})})
