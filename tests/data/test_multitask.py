"""Multitask tabular readers on tiny generated fixtures (same layouts as the shared files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaprox.data.labelled import DatasetLayoutError
from metaprox.data.multitask import (
    PARKINSONS_VOICE,
    load_computer_survey,
    load_landmine,
    load_multitask_npz,
    load_parkinsons,
    split_per_task,
)


def write_npz(path, n_tasks=3, per=4, d=2, binary=False, **extra):
    rng = np.random.default_rng(0)
    task = np.repeat(np.arange(n_tasks), per).astype(np.int16)
    y = rng.integers(0, 2, len(task)).astype(np.int8) if binary else rng.normal(size=len(task))
    np.savez(path, X=rng.normal(size=(len(task), d)), y=y, task=task, task_sizes=np.bincount(task), **extra)


def test_landmine_and_tasks(tmp_path):
    write_npz(tmp_path / "landmine.npz", binary=True)
    data = load_landmine(tmp_path)
    assert data.num_tasks == 3 and data.task_sizes.tolist() == [4, 4, 4] and data.y.dtype == np.int64
    tasks = data.tasks(y_dtype=torch.int64)
    assert len(tasks) == 3 and tasks[0].y.shape == (4,) and tasks[0].x.dtype == torch.float64
    reg = data.tasks(mean=np.zeros(2), std=np.ones(2) * 2)
    assert reg[1].y.shape == (4, 1) and torch.allclose(reg[0].x * 2, torch.as_tensor(data.x[:4]))


def test_survey_drops_constant(tmp_path):
    write_npz(tmp_path / "computer_survey.npz", d=3, feature_names=np.array(["const", "a", "b"]),
              profile=np.tile(np.arange(1, 5), 3))
    data = load_computer_survey(tmp_path)
    assert data.x.shape == (12, 2) and data.feature_names == ["a", "b"] and "profile" in data.extra


def test_bad_files(tmp_path):
    np.savez(tmp_path / "landmine.npz", X=np.zeros((2, 1)), y=np.zeros(2), task=np.zeros(2, int),
             task_sizes=np.array([3]))
    with pytest.raises(DatasetLayoutError, match="task_sizes"):
        load_landmine(tmp_path)
    with pytest.raises(DatasetLayoutError, match="not found"):
        load_multitask_npz(tmp_path / "nope.npz")


def test_parkinsons_csv(tmp_path):
    head = ["subject#", "age", "sex", "test_time", "motor_UPDRS", "total_UPDRS", *PARKINSONS_VOICE]
    rows = [[s, 70, 0, t, 20 + s, 30 + s, *([0.5] * 16)] for s in (3, 7) for t in range(3)]
    with open(tmp_path / "parkinsons_updrs.csv", "w") as f:
        f.write(",".join(head) + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    data = load_parkinsons(tmp_path)
    assert data.num_tasks == 2 and data.x.shape == (6, 16) and data.y[0] == 33.0
    assert load_parkinsons(tmp_path, target="motor_UPDRS").y[-1] == 27.0


def test_split_per_task():
    task = np.repeat(np.arange(3), [10, 20, 5])
    mask = split_per_task(task, 0.2, np.random.default_rng(0))
    assert np.bincount(task[mask]).tolist() == [2, 4, 2]
