"""`TaskShare`: one process's contiguous share ``[lo, hi)`` of a global task minibatch, without the other tasks.

Under torchrun every rank solves only ``tasks[lo:hi]`` of the global minibatch of ``B`` tasks. Building the other
tasks is wasted serial work, so a task family can draw the random numbers of all ``B`` tasks (the generator ends
in the same state, every task has the same content) and build only its share. What the outer step still needs to
know about the whole batch travels with the share: its size ``B`` and every task's (support, query) example
counts — the inner-minibatch draws are shaped by the largest task of the global batch, and a rule that needs query
sets must fail alike on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from metaprox.tasks.task import Task

__all__ = ["TaskShare", "share_bounds"]


def share_bounds(part: slice | None, total: int) -> tuple[int, int]:
    """``(lo, hi)`` of a contiguous ``part`` of ``total`` tasks (None: all of them); errors on anything else."""
    if part is None:
        return 0, total
    if not isinstance(part, slice) or part.step not in (None, 1):
        raise ValueError(f"part must be a contiguous slice(lo, hi) of the minibatch, got {part!r}.")
    lo = 0 if part.start is None else part.start
    hi = total if part.stop is None else part.stop
    if not 0 <= lo <= hi <= total:
        raise ValueError(f"part [{lo}, {hi}) does not lie within a minibatch of {total} tasks.")
    return lo, hi


def _counts(task: Task) -> tuple[int, int]:
    if not isinstance(task, Task):
        raise TypeError(f"tasks must be metaprox.Task objects, got {type(task).__name__}.")
    return task.num_examples, 0 if task.x_query is None else int(task.x_query.shape[0])


@dataclass(frozen=True, eq=False)
class TaskShare:
    """Tasks ``[lo, lo + len(tasks))`` of a global minibatch of ``total`` tasks.

    Args:
        tasks: this process's tasks, in minibatch order.
        total: ``B``, the size of the global minibatch (task weights passed to ``MetaLearner.step`` refer to it).
        lo: the index of ``tasks[0]`` in the global minibatch.
        example_counts: ``(support, query)`` example counts of *every* task of the global minibatch (query 0:
            no query set); the families build it without building the tasks (e.g. ``((k, q),) * B``).

    Raises:
        ValueError: if the share does not fit in the minibatch or its tasks' sizes disagree with
            ``example_counts``.
    """

    tasks: Sequence[Task]
    total: int
    lo: int
    example_counts: Sequence[tuple[int, int]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", list(self.tasks))
        share_bounds(slice(self.lo, self.lo + len(self.tasks)), self.total)
        if len(self.example_counts) != self.total:
            raise ValueError(f"example_counts has {len(self.example_counts)} entries for a minibatch of "
                             f"{self.total} tasks: give the (support, query) counts of every task.")
        local = [_counts(t) for t in self.tasks]
        if local != [tuple(c) for c in self.example_counts[self.part]]:
            raise ValueError(f"the (support, query) example counts of tasks [{self.lo}, {self.part.stop}) are "
                             f"{local}, but example_counts says {list(self.example_counts[self.part])}.")

    @classmethod
    def of(cls, tasks: Sequence[Task], part: slice) -> TaskShare:
        """The share ``part`` of a fully built minibatch ``tasks`` (what a plain list of tasks means)."""
        tasks = list(tasks)
        lo, hi = share_bounds(part, len(tasks))
        return cls(tasks[lo:hi], len(tasks), lo, [_counts(t) for t in tasks])

    @classmethod
    def uniform(cls, tasks: Sequence[Task], total: int, part: slice | None, support: int,
                query: int) -> TaskShare:
        """The share ``part`` of a minibatch of ``total`` tasks that all have ``support`` and ``query`` examples."""
        return cls(tasks, total, share_bounds(part, total)[0], ((support, query),) * total)

    @property
    def part(self) -> slice:
        return slice(self.lo, self.lo + len(self.tasks))

    @property
    def lacking_query(self) -> int:
        """How many tasks of the global minibatch have no query set."""
        return sum(q == 0 for _, q in self.example_counts)

    def max_examples(self, with_query: bool) -> int:
        """The largest support (``with_query``: support + query) size over the global minibatch."""
        return max(s + (q if with_query else 0) for s, q in self.example_counts)
