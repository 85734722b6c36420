"""Finite task sets: n named tasks of any sizes, how to sample them, and how strongly each is pulled.

- :class:`TaskSet` — named :class:`~metaprox.tasks.task.Task` objects with weights ``w_t``; ``groups(idx)``
  stacks the requested tasks by shape for batched solving.
- :class:`GeneratedTaskSet` — tasks produced on demand from their indices (for 10⁶ tasks that never sit in
  memory together); same interface.
- :class:`TaskSampler` — minibatches of task indices: with or without replacement (epochs), optionally
  proportional to probabilities, or the full batch.
- :func:`task_lam_factors` — the per-task pull factor s_t (λ_t = s_t·λ): constant, scaled with task size
  (more data → weaker pull), or user-given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from metaprox.checkpoint import decode_rng, encode_rng
from metaprox.tasks.task import Task

__all__ = ["TaskSet", "GeneratedTaskSet", "TaskSampler", "task_lam_factors", "estimator_weights"]

Group = tuple[np.ndarray, torch.Tensor, torch.Tensor]


def _weights(weights: Any, n: int) -> torch.Tensor:
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    w = w.flatten()
    if w.numel() != n or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"task weights must be {n} finite numbers ≥ 0, not all zero.")
    return w


class TaskSet:
    """n named tasks (any sizes) with weights ``w_t`` (default 1) in the joint objective.

    Args:
        tasks: the tasks; names come from ``Task.name`` or ``names`` (default ``"task{i}"``); unique.
        weights: w_t ≥ 0 per task.
    """

    def __init__(self, tasks: Sequence[Task], names: Sequence[str] | None = None, weights: Any = None):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("a TaskSet needs at least one task.")
        for t in self.tasks:
            if not isinstance(t, Task):
                raise TypeError(f"TaskSet holds metaprox.Task objects, got {type(t).__name__}.")
        if names is None:
            names = [t.name if t.name is not None else f"task{i}" for i, t in enumerate(self.tasks)]
        self.names = [str(n) for n in names]
        if len(self.names) != len(self.tasks) or len(set(self.names)) != len(self.names):
            raise ValueError("TaskSet names must be unique, one per task.")
        self._pos = {n: i for i, n in enumerate(self.names)}
        self.sizes = torch.tensor([t.num_examples for t in self.tasks], dtype=torch.float64)
        self.weights = _weights(weights, len(self.tasks))

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def index(self, name: str) -> int:
        return self._pos[name]

    def groups(self, idx: Sequence[int] | np.ndarray) -> list[Group]:
        """Tasks ``idx`` stacked by shape: ``[(positions in idx, x (b, n, ...), y (b, n, ...)), …]``."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        by_key: dict[tuple, list[int]] = {}
        for pos, i in enumerate(idx.tolist()):
            by_key.setdefault(self.tasks[i].shape_key(), []).append(pos)
        out = []
        for positions in by_key.values():
            ts = [self.tasks[int(idx[p])] for p in positions]
            out.append((np.asarray(positions), torch.stack([t.x for t in ts]), torch.stack([t.y for t in ts])))
        return out


class GeneratedTaskSet:
    """``num_tasks`` tasks of ``size`` examples each, produced on demand by ``make(indices) -> (x, y)``
    with a leading task axis (e.g. deterministic in the index), so that 10⁶ tasks need no resident data."""

    def __init__(self, num_tasks: int, size: int, make: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
                 weights: Any = None):
        self.num_tasks, self.make = int(num_tasks), make
        self.sizes = torch.full((self.num_tasks,), float(size), dtype=torch.float64)
        self.weights = _weights(weights, self.num_tasks)

    def __len__(self) -> int:
        return self.num_tasks

    @property
    def names(self) -> list[str]:
        return [f"task{i}" for i in range(self.num_tasks)]

    def groups(self, idx: Sequence[int] | np.ndarray) -> list[Group]:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        x, y = self.make(idx)
        return [(np.arange(len(idx)), x, y)]


class TaskSampler:
    """Minibatches of task indices.

    Args:
        num_tasks: n. batch_size: tasks per batch; ``None`` = the full batch (all tasks, in order).
        replacement: draw i.i.d. (``probs`` or uniform); otherwise shuffled epochs — every task once per epoch,
            the last batch of an epoch may be shorter.
        probs: sampling probabilities (with replacement only). seed: seed of the sampler's own generator.
    """

    def __init__(self, num_tasks: int, batch_size: int | None = None, replacement: bool = False,
                 probs: Any = None, seed: int = 0):
        self.n = int(num_tasks)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError("batch_size must be ≥ 1 or None (full batch).")
        if probs is not None and not replacement:
            raise ValueError("sampling probabilities need replacement=True.")
        if probs is not None and batch_size is None:
            raise ValueError("sampling probabilities need a batch_size (batch_size=None is the full batch, every "
                             "task once, which ignores them); for weighted tasks without sampling give the "
                             "TaskSet weights instead.")
        self.batch_size = None if batch_size is None else \
            (int(batch_size) if replacement else min(int(batch_size), self.n))
        self.replacement = replacement
        self.probs = None if probs is None else _weights(probs, self.n)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._perm: torch.Tensor | None = None
        self._at = 0

    def __call__(self) -> np.ndarray:
        if self.batch_size is None:
            return np.arange(self.n)
        if self.replacement:
            if self.probs is None:
                return torch.randint(self.n, (self.batch_size,), generator=self.generator).numpy()
            return torch.multinomial(self.probs, self.batch_size, True, generator=self.generator).numpy()
        if self._perm is None or self._at >= self.n:
            self._perm, self._at = torch.randperm(self.n, generator=self.generator), 0
        out = self._perm[self._at:self._at + self.batch_size]
        self._at += len(out)
        return out.numpy()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (generator, current epoch's permutation and position), for exact resumes."""
        return {"generator": encode_rng(self.generator.get_state()), "at": self._at,
                "perm": None if self._perm is None else self._perm.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(decode_rng(state["generator"]))
        self._at = int(state["at"])
        self._perm = None if state["perm"] is None else torch.tensor(state["perm"], dtype=torch.int64)


def estimator_weights(weights: torch.Tensor, idx: np.ndarray, sampler: Any = None,
                      drawn: bool = True) -> torch.Tensor:
    """â_t = (w_t/W) / (B·p_t) for the batch ``idx`` (W = Σ_all w_t, B = len(idx), p_t the per-draw probability
    of task t): Σ_batch â_t g_t is an unbiased estimate of Σ_all (w_t/W) g_t, so a meta-gradient built from it has
    the weighted joint objective's minimiser as its fixed point. (Normalising by the batch's own weight sum is a
    ratio estimator, biased unless the batch is everything.) p_t = the ``sampler``'s ``probs`` for i.i.d. draws
    with probabilities (``drawn``: ``idx`` came from that sampler); else 1/n — uniform i.i.d. draws, shuffled
    epochs, explicit batches and samplers without ``probs``, where task t is in a batch of B with probability
    B/n. The full batch gives w_t/W and unit weights 1/B, both bitwise as the batch-sum ratio."""
    n, b = len(weights), len(idx)
    wt, total = weights[idx], weights.sum()
    probs = getattr(sampler, "probs", None) if drawn else None
    if probs is None:
        return wt / (total if b == n else total * b / n)
    p = (probs / probs.sum())[idx].to(weights.dtype)
    return wt / (total * b * p)


def task_lam_factors(sizes: Any, how: str | Sequence[float] | torch.Tensor = "constant",
                     power: float = 1.0) -> torch.Tensor:
    """Per-task pull factors s_t, so that task t's prox weight is λ_t = s_t·λ.

    ``how``: ``"constant"`` (s_t = 1); ``"size"`` (s_t = (n̄ / n_t)^power: a task with more data is pulled
    less toward the prior — with a mean loss, power 1 is the same λ on the *summed* loss of every task); or
    the factors themselves (any non-negative numbers).
    """
    n = torch.as_tensor(sizes, dtype=torch.float64).flatten()
    if isinstance(how, str):
        if how == "constant":
            return torch.ones_like(n)
        if how == "size":
            return (n.mean() / n) ** float(power)
        raise ValueError(f"unknown task λ rule {how!r}: use 'constant', 'size' or a sequence of factors.")
    s = torch.as_tensor(how, dtype=torch.float64).flatten()
    if s.numel() != n.numel() or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"per-task λ factors must be {n.numel()} finite numbers ≥ 0.")
    return s
