"""TaskSet, GeneratedTaskSet, TaskSampler and per-task λ factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metaprox
from metaprox.tasks.taskset import GeneratedTaskSet, TaskSampler, TaskSet, task_lam_factors


def make(n):
    return metaprox.Task(torch.zeros(n, 2), torch.zeros(n, 1))


def test_taskset_groups_by_shape_and_names():
    ts = TaskSet([make(3), make(5), make(3)], names=["a", "b", "c"], weights=[1, 2, 3])
    groups = ts.groups([2, 1, 0])
    assert [g[0].tolist() for g in groups] == [[0, 2], [1]]
    assert groups[0][1].shape == (2, 3, 2) and ts.index("b") == 1 and ts.sizes.tolist() == [3, 5, 3]
    with pytest.raises(ValueError):
        TaskSet([make(3), make(3)], names=["a", "a"])
    with pytest.raises(ValueError):
        TaskSet([make(3)], weights=[-1.0])


def test_generated_taskset():
    ts = GeneratedTaskSet(10, 4, lambda idx: (torch.zeros(len(idx), 4, 1), torch.as_tensor(idx).view(-1, 1, 1)
                                              .expand(-1, 4, 1).float()))
    (pos, x, y), = ts.groups([7, 2])
    assert pos.tolist() == [0, 1] and float(y[0, 0, 0]) == 7 and len(ts) == 10


def test_sampler_without_replacement_covers_each_epoch():
    s = TaskSampler(10, batch_size=4, seed=1)
    epoch = np.concatenate([s(), s(), s()])
    assert sorted(epoch.tolist()) == list(range(10))
    assert TaskSampler(5)().tolist() == [0, 1, 2, 3, 4]


def test_sampler_with_replacement_follows_probs():
    s = TaskSampler(3, batch_size=3000, replacement=True, probs=[0.0, 1.0, 3.0], seed=0)
    counts = np.bincount(s(), minlength=3)
    assert counts[0] == 0 and 0.2 < counts[1] / 3000 < 0.3
    with pytest.raises(ValueError):
        TaskSampler(3, batch_size=2, probs=[1, 1, 1])


def test_task_lam_factors():
    sizes = [10, 20, 40]
    assert task_lam_factors(sizes).tolist() == [1.0, 1.0, 1.0]
    s = task_lam_factors(sizes, "size")
    assert torch.allclose(s * torch.tensor(sizes, dtype=torch.float64), torch.full((3,), 70 / 3, dtype=torch.float64))
    assert task_lam_factors(sizes, [1, 2, 3]).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        task_lam_factors(sizes, "bigger")


def test_sampler_refuses_probabilities_for_the_full_batch():
    with pytest.raises(ValueError, match="need a batch_size"):
        TaskSampler(3, None, replacement=True, probs=[1, 1, 2])
