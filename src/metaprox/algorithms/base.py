"""`MetaLearner`: what every meta-gradient rule shares — meta-parameters, inner solves, THE outer step.

The meta-parameters ``w`` are the model's trainable parameters (plus a prior's own: tree nodes). One outer
iteration (:meth:`MetaLearner.step`), the same for every rule × prior × pull × memory (:mod:`metaprox.composition`):

1. the centers: ``w`` for every task, or each task's node of a :attr:`hierarchy` (:class:`~metaprox.priors.TreePrior`);
   with a :attr:`memory` (:class:`~metaprox.memory.TaskMemory`, a finite task set) the minibatch is a set of task
   indices, its weights the unbiased estimator's, and the warm starts the stored ``v_t``;
2. group the tasks by shape and solve each group's prox problems ``min_v L_T(v) + D(v, c_T)`` (batched, the one
   solve loop :func:`metaprox.solve.solve_groups`) on the data named by ``inner_data`` — support, or support ∪
   query;
3. ask the rule (:meth:`meta_gradient`, the only thing most subclasses define) for the *unnormalised* weighted
   sum ``Σ_T a_T g_T`` of the per-task meta-gradients w.r.t. the centers (linear in the weights; per node for a
   tree). A rule that must differentiate *through* the solve (second-order MAML) overrides
   :meth:`solve_and_meta_gradient`, which does steps 2–3;
4. sum those partial sums, the weight sum and the monitor sums over processes with the :attr:`reducer`
   (one process: the identity; under torchrun: one all-reduce, each rank having solved only its share
   ``reducer.part(B)`` of the minibatch — given the whole list, or only that share as a
   :class:`~metaprox.tasks.share.TaskShare` — see :mod:`metaprox.distributed`), and normalise:
   ``g = Σ a_T g_T / Σ a_T``;
5. :meth:`apply_meta_gradient` — the one place where the outer optimizer steps, for every learner (also
   FiniteMMP's and the multi-head learners' own steps): ``.grad``, ``optimizer.step()`` (learning rate
   scheduled), then the prior's own update (tree nodes; exact centers);
6. return the diagnostics.

Test time is :meth:`adapt_tasks` (the same solve, the prior's center and pull, carried moments read).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from metaprox.distributed import LocalReducer, Reducer
from metaprox.execution import Execution, FunctionalModel
from metaprox.head_init import check_head_init, head_center
from metaprox.losses import Loss, LossFn, resolve_loss
from metaprox.prox import Penalty, make_prox
from metaprox.solve import INNER_DATA, SolvedGroup, solve_groups, stacked
from metaprox.solvers import SGD, AdamMoments, InnerSolver
from metaprox.tasks.share import TaskShare
from metaprox.tasks.task import Task

__all__ = ["MetaLearner", "SolvedGroup", "check_weights", "NonFiniteError", "InexactInnerSolveWarning", "INNER_DATA"]

Tensors = list[torch.Tensor]
OptimizerSpec = torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None


class NonFiniteError(FloatingPointError):
    """A loss or meta-gradient became NaN/inf; the meta-parameters were left untouched."""


class InexactInnerSolveWarning(RuntimeWarning):
    """Inner stationarity is far above the meta-gradient norm: the inner problems are not being solved."""


def check_weights(weights: Any, n: int) -> torch.Tensor:
    """``weights`` as float64 ``(n,)``: finite, ≥ 0, not all zero (else ``ValueError``)."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"got {w.numel()} task weights for {n} tasks.")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("task weights must be finite, ≥ 0, and not all zero.")
    return w


class MetaLearner:
    supports_shared = False  # rules that handle λ = ∞ ("shared") parameter groups set this
    supports_carried_moments = True  # MetaLearner.step keeps Adam(carry_moments=True)'s running moments
    places: str | None = None  # what step()'s where= gives besides tree nodes (a multi-head learner: "kind")
    """Base class of meta-gradient rules; see :class:`metaprox.MetaMinibatchProx` for the arguments.

    ``inner_data`` says which examples of a task the inner problem is solved on during meta-training:
    ``"support"`` (default) or ``"support+query"`` (the union — the paper's MMP has one data set per task and
    uses it for the inner and the outer step). Rules whose meta-gradient is the query loss (``needs_query``:
    FOMAML, MAML, iMAML) accept only ``"support"``. :meth:`adapt` always uses the support set.
    """

    #: the rule's meta-gradient uses ``Task.x_query``/``y_query`` (checked before any work is done)
    needs_query: bool = False
    #: the rule's name in :mod:`metaprox.composition` (which combinations it supports)
    rule_name: str | None = None

    def __init__(self, model: nn.Module, loss: str | LossFn | Loss = "mse",
                 lam: float | Mapping[str, float] | Penalty | None = 1.0, inner: InnerSolver | None = None,
                 meta_optimizer: OptimizerSpec = None, outer_lr: float = 1.0, total_steps: int | None = None,
                 schedule: str = "linear", execution: str = "auto", seed: int = 0,
                 stationarity_warn_ratio: float = 10.0, inner_data: str = "support", precision: str = "fp32"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.fmodel = FunctionalModel(model)
        self.names = self.fmodel.names
        self.loss = resolve_loss(loss)
        self.prox = make_prox(lam, self.names)
        if getattr(self.prox, "any_shared", False) and not self.supports_shared:
            raise ValueError(f"{type(self).__name__} does not support 'shared' parameter groups (λ = ∞: tied to the "
                             f"center, trained jointly); use metaprox.algorithms.finite.FiniteMMP, or a finite λ.")
        self.inner = inner if inner is not None else SGD()
        if not isinstance(self.inner, InnerSolver):
            raise TypeError(f"inner must be a metaprox solver (SGD, Adam, ExactLeastSquares), got {self.inner!r}.")
        if getattr(self.inner, "carry_moments", False) and not self.supports_carried_moments:
            raise ValueError(f"{type(self).__name__} does not carry inner Adam moments across tasks; use "
                             f"Adam(carry_moments=False).")
        self.execution = Execution(self.fmodel, self.loss, execution, precision)
        if inner_data not in INNER_DATA:
            raise ValueError(f"unknown inner_data {inner_data!r}; choose one of {INNER_DATA}.")
        if inner_data != "support" and self.needs_query:
            raise ValueError(f"{type(self).__name__} evaluates its meta-gradient on the query set, so its "
                             f"inner problem must use the support set only (inner_data='support'), "
                             f"not {inner_data!r}.")
        self.inner_data = inner_data
        if schedule not in ("linear", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}: use 'linear' (η_s = α(1 − s/S)) or 'constant'.")
        if schedule == "linear" and total_steps is None:
            schedule = "constant"
        if total_steps is not None and int(total_steps) < 1:
            raise ValueError(f"total_steps = {total_steps}: must be ≥ 1.")
        self.schedule, self.total_steps = schedule, total_steps
        self.optimizer = self._make_optimizer(meta_optimizer, outer_lr)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.step_count = 0
        self._step_keys: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(int(seed))
        self.stationarity_warn_ratio = stationarity_warn_ratio
        self._warned = False
        #: who solves which tasks of a minibatch and how partial sums combine (set by the trainer under torchrun)
        self.reducer: Reducer = LocalReducer()
        #: running moments of a moment-carrying inner solver (``Adam(carry_moments=True)``); None until set
        self.inner_moments: AdamMoments | None = None
        #: a prior with several centers (:class:`~metaprox.algorithms.hierarchical.TreePrior`); None: w only
        self.hierarchy: Any = None
        #: a finite task set's memory (:class:`~metaprox.memory.TaskMemory`); None: the infinite task stream
        self.memory: Any = None
        self._refuse()

    def _refuse(self) -> None:
        """Refuse a rule × pull that cannot run even on the plain task stream (:mod:`metaprox.composition`);
        a prior or memory attached later (TreePrior, TaskMemory) checks its own part."""
        from metaprox.composition import refuse

        refuse(self)

    # ----- construction helpers -------------------------------------------------------------------
    def _make_optimizer(self, spec: OptimizerSpec, outer_lr: float) -> torch.optim.Optimizer:
        params = self.fmodel.params()
        if spec is None:
            if not outer_lr > 0:
                raise ValueError(f"outer_lr = {outer_lr}: must be > 0.")
            return torch.optim.SGD(params, lr=outer_lr)
        if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):  # a class, e.g. torch.optim.SGD:
            if not outer_lr > 0:                                  # built with outer_lr, not its own default lr
                raise ValueError(f"outer_lr = {outer_lr}: must be > 0.")
            optimizer_class: Callable[..., torch.optim.Optimizer] = spec  # a subclass: takes lr (the base does not)
            return optimizer_class(params, lr=outer_lr)
        if isinstance(spec, torch.optim.Optimizer):
            opt = spec
        else:
            factory: Callable[..., Any] = spec  # a user's callable params -> Optimizer; its result is checked below
            opt = factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError("meta_optimizer must be a torch.optim.Optimizer or a callable params -> Optimizer.")
        given = {id(p) for g in opt.param_groups for p in g["params"]}
        if given != {id(p) for p in params}:
            raise ValueError("meta_optimizer must optimize exactly the model's trainable parameters "
                             "(build it with model.parameters()).")
        return opt

    @property
    def base_lrs(self) -> list[float]:
        """The optimizer's learning rates before the schedule (per parameter group)."""
        return list(self._base_lrs)

    def lr_factor(self, step: int) -> float:
        """Schedule factor for outer iteration ``step`` (0-based): the paper's η_s = α(1 − s/S), or 1."""
        if self.schedule == "constant":
            return 1.0
        return max(0.0, 1.0 - step / float(self.total_steps))  # type: ignore[arg-type]

    # ----- the inner solve --------------------------------------------------------------------------
    def center(self) -> Tensors:
        return [p.detach() for p in self.fmodel.params()]

    def solve(self, tasks: Sequence[Task], *, center: Tensors | None = None, inner: InnerSolver | None = None,
              prox: Penalty | None = None, monitor: bool = True, data: str = "support",
              scale: torch.Tensor | None = None, on_group: Any = None,
              init: Tensors | None = None) -> list[SolvedGroup]:
        """Solve every task's prox problem (batched by shape, :func:`metaprox.solve.solve_groups`); returns the
        groups with their results. ``center``: one center for all tasks (default w) or a
        :class:`~metaprox.solve.PerTask` stack; ``scale``: per-task pull factors; ``data``: ``"support"`` or
        ``"support+query"`` (each task's support and query examples, concatenated). The minibatch's pre-drawn
        inner-minibatch keys are used when this is the training solve of :meth:`step`; the carried Adam moments
        (``Adam(carry_moments=True)``) whenever the solver carries them — in training and at test time alike."""
        if isinstance(tasks, Task):
            tasks = [tasks]
        if len(tasks) == 0:
            raise ValueError("got an empty list of tasks.")
        for t in tasks:
            if not isinstance(t, Task):
                raise TypeError(f"tasks must be metaprox.Task objects, got {type(t).__name__}.")
        c = self.center() if center is None else center
        solver, penalty = inner or self.inner, prox or self.prox
        if self.step_count == 0 and not getattr(self, "_shapes_checked", False):
            x, y = self.execution.stack(tasks[:1])
            with torch.no_grad():
                self.loss.check_shapes(self.fmodel.single(self.center(), x[0]), y[0])
            self._shapes_checked = True
        keys = self._step_keys
        if keys is not None and (keys.shape[0] != len(tasks) or solver is not self.inner):
            keys = None  # not this step's minibatch: draw from the generator instead
        moments = self.inner_moments if getattr(solver, "carry_moments", False) else None
        return solve_groups(self.execution, stacked(self.execution, tasks, data), solver, penalty, c,
                            init=init, scale=scale, shared=getattr(penalty, "shared", None), keys=keys, moments=moments,
                            generator=self.generator, monitor=monitor, on_group=on_group)

    # ----- the outer step ---------------------------------------------------------------------------
    def meta_gradient(self, tasks: Sequence[Task], solved: list[SolvedGroup],
                      weights: torch.Tensor) -> Tensors:
        """``Σ_T a_T g_T`` over ``tasks`` (one tensor per parameter, no task axis), ``g_T`` the rule's per-task
        meta-gradient: linear in the (unnormalised) ``weights``, so partial sums over disjoint task sets add
        up. Defined by each rule."""
        raise NotImplementedError

    def solve_and_meta_gradient(self, tasks: Sequence[Task], center: Tensors, weights: torch.Tensor,
                                monitor: bool, init: Tensors | None = None, scale: torch.Tensor | None = None,
                                where: Sequence[Any] | None = None) -> tuple[list[SolvedGroup], Tensors]:
        """Steps 1–2 of an outer iteration: the inner solves at ``center`` (w, or a :class:`PerTask` stack of the
        tasks' centers; warm-started at ``init``, per-task pulls ``scale``: a task memory's), then
        :meth:`meta_gradient` (the gradient w.r.t. the centers the tasks saw). ``where``: each task's place
        (its kind), for learners whose solve depends on it (:attr:`places`); None here."""
        solved = self.solve(tasks, center=center, monitor=monitor, data=self.inner_data, init=init, scale=scale)
        return solved, self.meta_gradient(tasks, solved, weights)

    def step(self, tasks: Sequence[Task] | TaskShare | Any = None,
             weights: Sequence[float] | torch.Tensor | None = None, monitor: bool = True,
             where: Sequence[Any] | None = None) -> dict[str, float]:
        """One outer iteration on a minibatch of tasks; returns diagnostics (theory monitors if ``monitor``).

        ``tasks`` is the whole minibatch, or only this process's share of it (a :class:`TaskShare` of the part
        ``reducer.part(B)``: what a task family builds under torchrun). ``weights`` always refer to the whole
        minibatch of ``B`` tasks, and so does ``where`` (each task's place in a prior with several centers,
        e.g. its group in a tree: :attr:`hierarchy`). With a task memory (:attr:`memory`, a finite task set)
        ``tasks`` are task indices (None: the memory's sampler draws them) and the weights are its estimator's.
        """
        memory, ids = self.memory, None
        if memory is not None:
            if weights is not None:
                raise ValueError("with a task memory the task weights come from its TaskSet and sampler.")
            ids, tasks, weights = memory.batch(tasks)
        if isinstance(tasks, Task):
            tasks = [tasks]
        total = tasks.total if isinstance(tasks, TaskShare) else len(tasks)
        if total == 0:
            raise ValueError("step() got no tasks: pass a non-empty minibatch of metaprox.Task objects.")
        a = check_weights(weights if weights is not None else [1.0] * total, total)
        part = self.reducer.part(total)  # this process's share of the minibatch (all of it, usually)
        share = self._share(tasks, part)
        lacking = share.lacking_query
        if (self.needs_query or self.inner_data == "support+query") and lacking:
            why = "its meta-gradient is a query loss" if self.needs_query else "inner_data='support+query'"
            raise ValueError(f"{type(self).__name__} needs a query set in every task (Task(x, y, x_query, "
                             f"y_query)) because {why}, but {lacking} of {total} tasks have none.")
        tree = self.hierarchy
        if where is None:  # a family's minibatch may know each task's place: GroupedTasks (nodes), KindedTasks
            where = getattr(tasks, "groups", None) or getattr(tasks, "kinds", None)
        elif tree is None and self.places is None:
            raise ValueError(f"{type(self).__name__} has one center, w: step() takes no where= (task places are "
                             f"for a tree prior or a multi-head learner's kinds).")
        if tree is not None:
            tree.begin(where, total)  # every rank: the same nodes, in the same order
        w = self.center()
        local, a_local = share.tasks, a[part]
        center = w if tree is None else tree.centers(part)
        keys = self._draw_minibatch_keys(share)
        self._step_keys = None if keys is None else keys[part]
        init, scale = (None, None) if memory is None else memory.start(ids, center)
        try:
            if local:
                places = None if self.places is None else self._places(where, total)[part]
                solved, grads = self.solve_and_meta_gradient(local, center, a_local, monitor, init, scale, places)
            else:
                solved, grads = [], [torch.zeros_like(t) for t in w]
            if tree is not None:  # Σ a_t g_t per center (each node's tasks), in the tree's order of this step
                grads = tree.split(self, local, solved, a_local, part, grads)
        finally:
            self._step_keys = None
        if memory is not None:
            memory.write(ids, solved)
        # â_t of a task memory are already the unbiased estimator's: no normalising by the batch
        sums = {"weight": 1.0 if memory is not None else float(a_local.sum()),
                **(self.monitor_sums(solved) if monitor else {})}
        carry = bool(getattr(self.inner, "carry_moments", False))
        n_grads = len(grads)
        if carry:
            # all-reduced with the meta-gradient (one call); a rule may return a tuple (torch._foreach_*)
            grads = [*grads, *self._moment_sums(solved, w)]
            sums["moment_tasks"] = float(len(local))
        grads, sums = self.reducer.sum(grads, sums)
        if carry:
            grads, m_sum, s_sum = grads[:n_grads], grads[n_grads:n_grads + len(w)], grads[n_grads + len(w):]
            n = sums["moment_tasks"]
            t = (0 if self.inner_moments is None else self.inner_moments.t) + int(self.inner.steps)
            self.inner_moments = AdamMoments(list(torch._foreach_div(m_sum, n)), list(torch._foreach_div(s_sum, n)), t)
        grads = list(torch._foreach_div(grads, sums["weight"]))
        also = None
        if tree is not None:  # the chain rule to w and the nodes, plus the tree's own pulls
            grads, also = tree.outer(grads, a / a.sum())
        diag = self.apply_meta_gradient(grads, also=also)
        if tree is not None:
            diag["groups"] = float(len(tree.nodes))
        if monitor:
            diag.update(self.monitors(sums))
        return diag

    def _places(self, where: Sequence[Any] | None, total: int) -> list[Any]:
        """Each task's place (:attr:`places`: e.g. its kind) for the whole minibatch of ``total`` tasks."""
        if where is None or len(where) != total:
            got = "none" if where is None else f"{len(where)}"
            raise ValueError(f"{type(self).__name__} needs each task's {self.places}: step(tasks, where=[...]) with "
                             f"one per task ({total}), or tasks as KindedTasks(tasks, kinds); got {got}.")
        return list(where)

    def apply_meta_gradient(self, grads: Tensors, *, step_w: bool = True,
                            also: Callable[[float], None] | None = None) -> dict[str, float]:
        """THE outer step of every learner: check the meta-gradient, schedule the lr, write ``.grad``, step the
        optimizer (unless ``step_w`` is False: a fixed center), then ``also(lr factor)`` — the prior's
        parameters outside the optimizer (tree nodes, exact center updates) — and count the step."""
        gnorm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        if not math.isfinite(gnorm):
            raise NonFiniteError(f"non-finite meta-gradient at outer step {self.step_count} (loss diverged?); "
                                 f"parameters were not updated. Lower the learning rates or λ.")
        factor = self.lr_factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor
        if step_w:
            for p, g in zip(self.fmodel.params(), grads, strict=True):
                p.grad = g.to(p.dtype)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if also is not None:
            also(factor)
        self.step_count += 1
        return {"step": float(self.step_count), "lr": self.optimizer.param_groups[0]["lr"], "meta_grad_norm": gnorm}

    @staticmethod
    def _moment_sums(solved: list[SolvedGroup], w: Tensors) -> Tensors:
        """Σ over this process's tasks of the inner solver's final first, then second moments."""
        m = [torch.zeros_like(t) for t in w]
        s = [torch.zeros_like(t) for t in w]
        for group in solved:
            mo = group.result.moments
            if mo is None:
                raise RuntimeError("the inner solver was asked to carry its moments but returned none.")
            torch._foreach_add_(m, [t.sum(0) for t in mo.m])
            torch._foreach_add_(s, [t.sum(0) for t in mo.s])
        return m + s

    def _share(self, tasks: Sequence[Task] | TaskShare, part: slice) -> TaskShare:
        """``tasks`` as this process's :class:`TaskShare` (a plain list is the whole minibatch: cut ``part``)."""
        if not isinstance(tasks, TaskShare):
            return TaskShare.of(tasks, part)
        if tasks.part != part:
            r = self.reducer
            raise ValueError(f"process {r.rank} of {r.world_size} solves tasks [{part.start}, {part.stop}) of a "
                             f"minibatch of {tasks.total}, but was given the share [{tasks.lo}, {tasks.part.stop}):"
                             f" build it for learner.reducer.part({tasks.total}) (e.g. family.train_share(B, "
                             f"generator, learner.reducer.part(B))).")
        return tasks

    def _draw_minibatch_keys(self, tasks: Sequence[Task] | TaskShare) -> torch.Tensor | None:
        """Uniforms (B, steps, n_max) that choose every task's inner minibatches for this outer step.

        Drawn once for the whole (global) minibatch, so results do not depend on how tasks are grouped by shape
        or split across processes (a :class:`TaskShare` knows the global ``n_max``); None when the inner solver
        uses full batches.
        """
        bs, steps = getattr(self.inner, "batch_size", None), int(getattr(self.inner, "steps", 0))
        if not bs or steps < 1:
            return None
        share = tasks if isinstance(tasks, TaskShare) else TaskShare.of(tasks, slice(0, len(tasks)))
        n_max = share.max_examples(with_query=self.inner_data == "support+query")
        return torch.rand(share.total, steps, n_max, generator=self.generator)

    def monitor_sums(self, solved: list[SolvedGroup]) -> dict[str, float]:
        """Sums over the solved tasks of the quantities :meth:`monitors` averages (and their count), each task
        measured against the center and penalty it was solved with."""
        stat = tgrad = sq = phi = loss = 0.0
        for s in solved:
            r, c, pen = s.result, s.center, s.penalty
            assert r.loss is not None and r.stationarity is not None and c is not None and pen is not None
            stat += float(r.stationarity.sum())
            tgrad_sq = cast(torch.Tensor, sum(g.square().flatten(1).sum(1) for g in pen.grad_c(r.params, c)))
            tgrad += float(tgrad_sq.sqrt().sum())
            sq += float(pen.sqdist(r.params, c).sum())
            phi += float((r.loss + pen.value(r.params, c)).sum())
            loss += float(r.loss.sum())
        return {"tasks": float(sum(len(s.indices) for s in solved)), "inner_stationarity": stat,
                "task_grad_norm": tgrad, "sigma2": sq, "phi": phi, "inner_loss": loss}

    def monitors(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Theory monitors, means over tasks (from :meth:`monitor_sums`, summed over processes): inner
        stationarity ‖∇L(v) + ∂_v D‖, per-task envelope-gradient norm ‖∂_w D(v_T, w)‖, ‖v_T − w‖² (the paper's
        σ²), φ_T = L_T(v_T) + D(v_T, w), and L_T(v_T)."""
        n = sums["tasks"]
        out = {k: sums[k] / n for k in ("inner_stationarity", "task_grad_norm", "sigma2", "phi", "inner_loss")}
        if not math.isfinite(out["phi"]):
            raise NonFiniteError(f"non-finite task loss at outer step {self.step_count}.")
        # An ε-stationary inner solution moves each task's envelope gradient by about ε (strong convexity of
        # the prox problem), so compare ε with the size of those per-task gradients.
        ratio = out["inner_stationarity"] / max(out["task_grad_norm"], 1e-12)
        out["stationarity_ratio"] = ratio
        if ratio > self.stationarity_warn_ratio and not self._warned:
            self._warned = True
            warnings.warn(f"mean inner stationarity {out['inner_stationarity']:.3g} is more than "
                          f"{self.stationarity_warn_ratio:g}× the mean per-task meta-gradient norm "
                          f"{out['task_grad_norm']:.3g}: the inner problems are far from solved, so the "
                          f"meta-gradient is mostly solver error. Use more inner steps or a larger inner "
                          f"learning rate.", InexactInnerSolveWarning, stacklevel=3)
        return out

    # ----- using the prior ----------------------------------------------------------------------------
    _test_head_init = "prior"

    @property
    def test_head_init(self) -> str:
        """Where :meth:`adapt_tasks` centers (and starts) a classifier's linear ``head``: ``"prior"`` (w's head, the
        default) or ``"prototypes"`` (each task's support-set prototypes; :mod:`metaprox.head_init`, which
        refuses it for a model without one linear head named ``head`` or a regression loss)."""
        return self._test_head_init

    @test_head_init.setter
    def test_head_init(self, value: str) -> None:
        check_head_init(self, value)
        self._test_head_init = value

    def test_prior(self, tasks: Sequence[Task], lam: float | None = None,
                   where: Any = None) -> tuple[Tensors, Penalty, torch.Tensor | None]:
        """(center, penalty, per-task pull factors or None) of new ``tasks`` at test time: w and the training
        penalty (``lam``: another λ for every group). Priors with more than one center (a tree) override this;
        ``where`` says where each task sits in them (e.g. its group)."""
        if self.hierarchy is not None:
            return self.hierarchy.test_prior(tasks, lam, where)
        if where is not None:
            raise ValueError(f"{type(self).__name__} has one center, w: adapt a task without a group/node.")
        return self.center(), self.prox if lam is None else make_prox(lam, self.names), None

    def adapt_tasks(self, tasks: Sequence[Task], steps: int | None = None, lam: float | None = None,
                    inner: InnerSolver | None = None, where: Any = None, on_group: Any = None) -> list[SolvedGroup]:
        """THE test-time path: solve new ``tasks`` (support sets) from the prior, exactly as in training —
        same solve loop, the prior's center and pull (:meth:`test_prior`; the head's center from the support set
        with ``test_head_init = "prototypes"``), carried Adam moments read (never updated). :meth:`adapt`,
        :func:`metaprox.evaluate.adaptation_curve` (hence ``metaprox eval`` and periodic validation) all call it.
        ``steps``/``inner`` override the solver, ``lam`` the pull."""
        solver = inner or self.inner
        if steps is not None:
            solver = solver.with_steps(steps)
        center, prox, scale = self.test_prior(tasks, lam, where)
        center = head_center(self, tasks, center)  # the prior's, or the support's prototypes (test_head_init)
        return self.solve(tasks, center=center, inner=solver, prox=prox, monitor=False, scale=scale,
                          on_group=on_group)

    def adapt(self, task: Task, steps: int | None = None, lam: float | None = None,
              inner: InnerSolver | None = None, where: Any = None) -> dict[str, torch.Tensor]:
        """Solve the prox problem of ``task`` centred at the learned prior; returns its parameters by name.

        ``steps`` overrides the solver's step count, ``lam`` the prox weight (default: the training λ);
        ``where``: the task's place in a prior with several centers (its tree node or group, a multi-head
        learner's kind; None: the root). The head starts from, and is pulled to, w's head or the support set's
        prototypes (:attr:`test_head_init`).
        """
        places = None if where is None and self.hierarchy is None and self.places is None else [where]
        return self._first(self.adapt_tasks([task], steps, lam, inner, where=places), where)

    def _first(self, solved: list[SolvedGroup], where: Any = None) -> dict[str, torch.Tensor]:
        """The parameters of the one task of ``solved``, by name (``where``: its place, for learners whose
        parameter names depend on it)."""
        return {n: t[0] for n, t in zip(self.names, solved[0].result.params, strict=True)}

    def predict(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Model output on ``x`` with the given parameters (e.g. from :meth:`adapt`)."""
        missing = set(self.names) - set(params)
        if missing:
            raise KeyError(f"params lack {sorted(missing)}; pass the dict returned by adapt().")
        return self.fmodel.single(dict(params), x)

    # ----- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step_count,
                 "params": {n: p.detach().clone() for n, p in zip(self.names, self.fmodel.params(), strict=True)},
                 "optimizer": self.optimizer.state_dict(), "base_lrs": list(self._base_lrs),
                 "generator": self.generator.get_state().clone()}
        if self.inner_moments is not None:
            mo = self.inner_moments
            state["inner_moments"] = {"t": mo.t, "m": {n: t.clone() for n, t in zip(self.names, mo.m, strict=True)},
                                      "s": {n: t.clone() for n, t in zip(self.names, mo.s, strict=True)}}
        if self.hierarchy is not None:
            state["buffers"] = self.hierarchy.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = state["params"]
        if set(params) != set(self.names):
            raise KeyError(f"state has parameters {sorted(params)} but the model has {sorted(self.names)}.")
        with torch.no_grad():
            for n, p in zip(self.names, self.fmodel.params(), strict=True):
                if params[n].shape != p.shape:
                    raise ValueError(f"parameter {n!r}: state shape {tuple(params[n].shape)} != model "
                                     f"shape {tuple(p.shape)}.")
                p.copy_(params[n])
        self.optimizer.load_state_dict(state["optimizer"])
        self._base_lrs = list(state["base_lrs"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        mo = state.get("inner_moments")
        self.inner_moments = None if mo is None else AdamMoments(
            [mo["m"][n].clone() for n in self.names], [mo["s"][n].clone() for n in self.names], int(mo["t"]))
        if self.hierarchy is not None:
            self.hierarchy.load_state_dict(state.get("buffers") or {})
