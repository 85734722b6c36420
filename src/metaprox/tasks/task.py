"""`Task`: one learning problem — a support set (x, y) and an optional query set (and `KindedTasks`, a minibatch
that knows each task's kind).

A task knows nothing about algorithms. It validates its data once, at construction, so that every later
error is about the algorithm and not about malformed input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Task", "TaskDataError", "KindedTasks"]


class TaskDataError(ValueError):
    """Raised when the data given to a :class:`Task` cannot define a learning problem."""


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TaskDataError(f"Task {what} must be a torch.Tensor or numpy array, got {type(value).__name__}.")


def _check_pair(x: torch.Tensor, y: torch.Tensor, which: str) -> None:
    xs, ys = f"x{which}", f"y{which}"
    if x.dim() == 0 or y.dim() == 0:
        raise TaskDataError(f"Task {xs} and {ys} need a leading example axis; got shapes "
                            f"{tuple(x.shape)} and {tuple(y.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise TaskDataError(f"Task {xs} has {x.shape[0]} examples but {ys} has {y.shape[0]}: "
                            f"they must have the same length along the first axis.")
    if x.shape[0] == 0:
        raise TaskDataError(f"Task {xs} is empty: a task needs at least one example.")
    if not x.is_floating_point():
        raise TaskDataError(f"Task {xs} has dtype {x.dtype}; inputs must be floating point "
                            f"(convert with x.float()).")
    if not (y.is_floating_point() or y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)):
        raise TaskDataError(f"Task {ys} has dtype {y.dtype}; targets must be floating point (regression) "
                            f"or integer class labels (classification).")
    if not bool(torch.isfinite(x).all()):
        raise TaskDataError(f"Task {xs} contains NaN or infinite values.")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise TaskDataError(f"Task {ys} contains NaN or infinite values.")


@dataclass(frozen=True, eq=False)
class Task:
    """A supervised task: support set ``(x, y)`` and optional query set ``(x_query, y_query)``.

    Args:
        x: inputs, shape ``(n, ...)``, floating point.
        y: targets, shape ``(n, ...)``; floating point for regression, integer labels for classification.
        x_query, y_query: an optional held-out set of the same task (both or neither). MMP, as in the paper,
            uses the support set for both the inner solve and the outer step; MAML-family rules use the query set.
        name: optional identifier (used by finite task sets and in error messages).

    Raises:
        TaskDataError: if lengths differ, a set is empty, dtypes are wrong or data contain NaN/inf.

    Example:
        >>> import torch, metaprox
        >>> t = metaprox.Task(torch.zeros(5, 1), torch.zeros(5, 1))
        >>> t.num_examples
        5
    """

    x: torch.Tensor
    y: torch.Tensor
    x_query: torch.Tensor | None = None
    y_query: torch.Tensor | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", _as_tensor(self.x, "x"))
        object.__setattr__(self, "y", _as_tensor(self.y, "y"))
        _check_pair(self.x, self.y, "")
        if (self.x_query is None) != (self.y_query is None):
            raise TaskDataError("Task needs both x_query and y_query, or neither.")
        if self.x_query is not None and self.y_query is not None:  # (both or neither, checked above)
            object.__setattr__(self, "x_query", _as_tensor(self.x_query, "x_query"))
            object.__setattr__(self, "y_query", _as_tensor(self.y_query, "y_query"))
            _check_pair(self.x_query, self.y_query, "_query")

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def has_query(self) -> bool:
        return self.x_query is not None

    def shape_key(self) -> tuple:
        """Tasks with equal keys can be stacked along a task axis and solved together."""
        q = None if self.x_query is None or self.y_query is None else (tuple(self.x_query.shape),
                                                                       tuple(self.y_query.shape))
        return (tuple(self.x.shape), tuple(self.y.shape), self.x.dtype, self.y.dtype, q)

    def to(self, device: torch.device | str) -> Task:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Task(self.x.to(device), self.y.to(device), mv(self.x_query), mv(self.y_query), self.name)


class KindedTasks(list):
    """A minibatch of tasks that knows each task's *kind* (which head of a multi-head model it uses):
    ``KindedTasks(tasks, kinds)``; :meth:`metaprox.MultiHeadMMP.step` reads ``kinds`` when not given them."""

    def __init__(self, tasks: Any, kinds: Any):
        super().__init__(tasks)
        self.kinds = [str(k) for k in kinds]
        if len(self.kinds) != len(self):
            raise ValueError(f"got {len(self.kinds)} kinds for {len(self)} tasks.")
