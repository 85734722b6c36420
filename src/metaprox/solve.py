"""The one solve loop: tasks grouped by shape → stacked → one :class:`ProxProblem` per group → the inner solver.

Training steps of every learner, :meth:`MetaLearner.adapt` and the evaluation curves all solve through
:func:`solve_groups`, so a task's prox problem is built the same way wherever it is solved (center, warm start,
per-task pull, shared groups, carried Adam moments, pre-drawn inner minibatches).

Per-task inputs (``center``, ``init``) are either one value for every task (a list of tensors without a task
axis) or a :class:`PerTask` list whose tensors carry a leading axis over the whole minibatch; each group takes
its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metaprox.execution import Execution, Oracle
from metaprox.prox import Penalty, TaskScaled
from metaprox.solvers import AdamMoments, Callback, InnerResult, InnerSolver, ProxProblem
from metaprox.tasks.task import Task
from metaprox.threads import solve_threads

__all__ = ["SolvedGroup", "PerTask", "TiedOracle", "stacked", "solve_groups", "INNER_DATA"]

Tensors = list[torch.Tensor]
Group = tuple[Any, torch.Tensor, torch.Tensor]  # (positions in the minibatch, x (b, n, ...), y (b, n, ...))
INNER_DATA = ("support", "support+query")


class PerTask(list):
    """Tensors with a leading axis over the tasks of the whole minibatch (a group takes its rows)."""


@dataclass
class SolvedGroup:
    """Tasks ``indices`` (positions in the minibatch) solved together: their data oracle, the inner result, and
    the problem's ``center`` and ``penalty`` (the center each task saw: a rule's meta-gradient is taken there)."""

    indices: Any
    oracle: Oracle
    result: InnerResult
    center: Tensors | None = None
    penalty: Penalty | None = None


class TiedOracle:
    """An oracle whose gradient is zero on shared groups: the inner solver keeps them at the center."""

    def __init__(self, oracle: Oracle, shared: Sequence[bool]):
        self.oracle, self.shared = oracle, list(shared)

    def __getattr__(self, item: str) -> Any:
        return getattr(self.oracle, item)

    def __call__(self, v: Tensors, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, Tensors]:
        losses, g = self.oracle(v, idx)
        for gi, sh in zip(g, self.shared, strict=True):
            if sh:
                gi.zero_()
        return losses, g


def stacked(execution: Execution, tasks: Sequence[Task], data: str = "support") -> Iterator[Group]:
    """The tasks grouped by shape and stacked: ``(positions, x, y)`` per group; ``data="support+query"``
    concatenates each task's support and query examples."""
    if data not in INNER_DATA:
        raise ValueError(f"unknown inner data {data!r}; choose one of {INNER_DATA}.")
    for idx in execution.groups(tasks):
        group = [tasks[i] for i in idx]
        x, y = execution.stack(group)
        if data == "support+query":
            xq, yq = execution.stack(group, query=True)
            x, y = torch.cat([x, xq], 1), torch.cat([y, yq], 1)
        yield idx, x, y


def _rows(value: Tensors | None, idx: Any) -> Tensors | None:
    if isinstance(value, PerTask):
        return PerTask(t[idx] for t in value)
    return value


def solve_groups(execution: Execution, groups: Iterable[Group], solver: InnerSolver, penalty: Penalty,
                 center: Tensors, *, init: Tensors | None = None, scale: torch.Tensor | None = None,
                 shared: Sequence[bool] | None = None, keys: torch.Tensor | None = None,
                 moments: AdamMoments | None = None, generator: torch.Generator | None = None,
                 monitor: bool = True,
                 on_group: Callable[[Any, torch.Tensor, Oracle], Callback | None] | None = None
                 ) -> list[SolvedGroup]:
    """Solve ``min_v L_t(v) + s_t·D(v, c_t)`` for every group of ``groups`` with ``solver``.

    ``scale``: per-task pull factors s_t over the minibatch (None: 1). ``shared``: per parameter, whether it is
    tied to the center (its gradient masked, so it never moves). ``keys``: the minibatch's pre-drawn inner
    minibatch uniforms ``(B, steps, n_max)``. ``moments``: where a moment-carrying solver starts.
    ``on_group(positions, x, oracle)`` may return a per-step callback for the solver (evaluation curves).
    """
    out = []
    tied = shared is not None and any(shared)
    for idx, x, y in groups:
        oracle = execution.oracle(x, y)
        pen = penalty if scale is None else TaskScaled(penalty, scale[idx])
        c = _rows(center, idx)
        problem = ProxProblem(TiedOracle(oracle, shared) if tied else oracle,  # type: ignore[arg-type]
                              pen, c, _rows(init, idx),  # type: ignore[arg-type]
                              keys=None if keys is None else keys[idx, :, : x.shape[1]], moments=moments)
        callback = on_group(idx, x, oracle) if on_group is not None else None
        with solve_threads(oracle, x, y):  # small gradients on one thread (metaprox.threads)
            result = solver.solve(problem, generator=generator, monitor=monitor, callback=callback)
        out.append(SolvedGroup(idx, oracle, result, c, pen))
    return out
