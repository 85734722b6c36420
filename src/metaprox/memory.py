"""Task memory for a finite set of named tasks, usable with any meta-gradient rule (the *memory* axis).

A :class:`TaskMemory` attached to a learner turns :meth:`MetaLearner.step <metaprox.algorithms.base.MetaLearner.step>`
into an outer step over a finite :class:`~metaprox.tasks.taskset.TaskSet`: the minibatch is a set of task indices
(the sampler's, or given), the task weights are the unbiased minibatch estimator â_t of
:func:`~metaprox.tasks.taskset.estimator_weights` (so the iteration's fixed point is the weighted full-batch one,
no normalising by the batch), every task's solution v_t is kept in a store (in memory or memory-mapped), and the
rules whose inner problem is a prox problem with a unique solution (MMP, iMAML) are warm-started from it.
Reptile, FOMAML and MAML are defined by a trajectory *from the center*, so they start there; their v_t are kept for
:meth:`TaskMemory.task_params` / :meth:`TaskMemory.predict_task`.

What the memory does not cover (graphs over tasks, exact and tree center updates, rank-sharded stores) runs
through :class:`~metaprox.algorithms.finite.FiniteMMP`; :mod:`metaprox.composition` says which combination
goes where.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metaprox.solve import PerTask, SolvedGroup
from metaprox.store import MemoryStore, ParamLayout, ShardedStore, TaskStore
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSampler, TaskSet, estimator_weights, task_lam_factors

__all__ = ["TaskMemory", "WARM_STARTED", "keeper_of"]

#: rules whose inner problem has a unique solution that a warm start only reaches faster
WARM_STARTED = ("mmp", "imaml")


def keeper_of(learner: Any) -> Any:
    """What holds a finite set's tasks, per-task parameters, store and sampler: the learner's task memory (any
    rule), or the learner itself (:class:`~metaprox.algorithms.finite.FiniteMMP`)."""
    memory = getattr(learner, "memory", None)
    return learner if memory is None else memory


class TaskMemory:
    """Named tasks with persistent v_t for ``learner`` (``learner.memory`` is set to it).

    Args:
        learner: any rule (MMP, Reptile, FOMAML, MAML, iMAML).
        tasks: a :class:`TaskSet` (its weights w_t enter the estimator; rules with a query-loss meta-gradient need
            a query set in every task).
        store: a :class:`~metaprox.store.TaskStore` (default: in memory, the model's dtype); memory-mapped
            stores work alike.
        sampler: a :class:`TaskSampler` for steps without indices (default: the full batch).
        task_lam: per-task pull factors s_t (``"constant"``, ``"size"`` or numbers; λ_t = s_t·λ).
    """

    def __init__(self, learner: Any, tasks: TaskSet, store: TaskStore | None = None,
                 sampler: TaskSampler | None = None, task_lam: Any = "constant", task_lam_power: float = 1.0):
        from metaprox.composition import refuse

        if not isinstance(tasks, TaskSet):
            raise TypeError(f"TaskMemory needs a TaskSet (Task objects), got {type(tasks).__name__}; a "
                            f"GeneratedTaskSet runs through metaprox.algorithms.finite.FiniteMMP.")
        self.scale = task_lam_factors(tasks.sizes, task_lam, task_lam_power)
        whole = isinstance(store, ShardedStore) and (store.lo, store.hi) == (0, len(tasks))  # one process's "shard"
        memory = "sharded" if isinstance(store, ShardedStore) and not whole else \
            "memory" if store is None or isinstance(store, MemoryStore) else "memmap"
        refuse(learner, prior="flat" if learner.hierarchy is None else "tree", memory=memory,
               per_task=not bool((self.scale == 1).all()))
        if learner.hierarchy is not None:
            raise ValueError("a tree prior with a finite task set runs through FiniteMMP(prior=Tree(...)).")
        if learner.reducer.world_size > 1:
            raise ValueError("TaskMemory runs in one process; rank-sharded stores run through FiniteMMP.")
        lacking = sum(not t.has_query for t in tasks.tasks)
        if learner.needs_query and lacking:
            raise ValueError(f"{type(learner).__name__}'s meta-gradient is a query loss, but {lacking} of "
                             f"{len(tasks)} tasks have no query set (Task(x, y, x_query, y_query)).")
        self.learner, self.tasks = learner, tasks
        params = learner.fmodel.params()
        self.layout = ParamLayout.of(learner.names, params)
        self.store = store if store is not None else MemoryStore(self.layout, len(tasks), params[0].dtype)
        if self.store.layout != self.layout or self.store.num_tasks != len(tasks):
            raise ValueError("the store was made for other parameters or another number of tasks.")
        self.sampler = sampler or TaskSampler(len(tasks))
        self.warm_start = learner.rule_name in WARM_STARTED
        learner.memory = self

    def batch(self, indices: Any) -> tuple[np.ndarray, list[Task], torch.Tensor]:
        """(task ids, their tasks, estimator weights â_t) of the next step; ``indices`` None: the sampler's."""
        if self.learner.reducer.world_size > 1:
            raise ValueError("TaskMemory runs in one process; rank-sharded stores run through FiniteMMP.")
        ids = self.sampler() if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise ValueError("empty batch of tasks.")
        a = estimator_weights(self.tasks.weights, ids, self.sampler, drawn=indices is None)
        return ids, [self.tasks[int(i)] for i in ids], a

    def start(self, ids: np.ndarray, center: list[torch.Tensor]) -> tuple[PerTask | None, torch.Tensor | None]:
        """(warm starts or None, per-task pull factors or None) of the tasks ``ids``."""
        init = None
        if self.warm_start:
            rows, _ = self.store.get(ids, center)
            init = PerTask(rows)
        scale = None if bool((self.scale == 1).all()) else self.scale[torch.from_numpy(ids)]
        return init, scale

    def write(self, ids: np.ndarray, solved: list[SolvedGroup]) -> None:
        """Store every task's solution (after checking that all are finite: else nothing is stored)."""
        rows = torch.empty(len(ids), self.layout.numel, dtype=self.store.dtype or torch.float64)
        for s in solved:
            flat = self.layout.flatten(s.result.params)
            if not bool(torch.isfinite(flat).all()):
                from metaprox.algorithms.base import NonFiniteError

                raise NonFiniteError(f"non-finite task solution at outer step {self.learner.step_count}; nothing "
                                     f"was stored.")
            rows[torch.as_tensor(s.indices)] = flat.to(rows.dtype)
        self.store.write(ids, rows)

    def task_params(self, i: int) -> dict[str, torch.Tensor]:
        """The stored v_t of task ``i`` (its center if never solved), by parameter name."""
        v, _ = self.store.get([i], self.learner.center())
        return {n: t[0] for n, t in zip(self.learner.names, v, strict=True)}

    @property
    def reducer(self) -> Any:
        """The learner's reducer (evaluation sums over it, as it does for a FiniteMMP)."""
        return self.learner.reducer

    def owned_range(self) -> tuple[int, int]:
        """The tasks this process holds: all of them (a task memory runs in one process)."""
        return 0, len(self.tasks)

    def predict_task(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Model output of task ``i`` (its stored v_t) on inputs ``x``."""
        with torch.no_grad():
            return self.learner.predict(self.task_params(i), x)
