"""Readers for classic multi-task tabular sets (finite task sets of very different sizes).

Every reader takes the folder that holds the files (``../shared/data/multitask`` in this project, or
``$METAPROX_DATA/multitask``) and returns a :class:`MultitaskData`: one row per example with its task id.

- ``landmine.npz`` — 29 fields, 9 radar features, mine 0/1 (Xue et al. 2007);
- ``computer_survey.npz`` — 190 respondents × 20 PC profiles, likelihood to buy 0..10 (Lenk et al. 1996);
  profiles 1–16 are for calibration, 17–20 for validation (``profile`` column);
- ``parkinsons_updrs.csv`` — 42 patients, 16 voice measures, motor/total UPDRS (Tsanas et al. 2009).

Every ``.npz`` holds ``X``, ``y``, ``task`` (0-based) and ``task_sizes`` (= bincount(task)); the reader checks
that they agree. Nothing is unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaprox.data.labelled import DatasetLayoutError, data_root
from metaprox.tasks.task import Task

__all__ = ["MultitaskData", "load_multitask_npz", "load_landmine", "load_computer_survey", "load_parkinsons",
           "split_per_task", "PARKINSONS_VOICE"]

PARKINSONS_VOICE = ["Jitter(%)", "Jitter(Abs)", "Jitter:RAP", "Jitter:PPQ5", "Jitter:DDP", "Shimmer",
                    "Shimmer(dB)", "Shimmer:APQ3", "Shimmer:APQ5", "Shimmer:APQ11", "Shimmer:DDA", "NHR", "HNR",
                    "RPDE", "DFA", "PPE"]


@dataclass
class MultitaskData:
    """Examples ``x`` (N, d) float64, targets ``y`` (N,) (or (N, k): several regression targets), task ids
    ``task`` (N,) in ``0..num_tasks-1``."""

    x: np.ndarray
    y: np.ndarray
    task: np.ndarray
    feature_names: list[str]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.task)):
            raise DatasetLayoutError("multitask data: x, y and task differ in length.")
        if len(self.task) and self.task.min() < 0:
            raise DatasetLayoutError("multitask data: negative task id.")

    @property
    def num_tasks(self) -> int:
        return int(self.task.max()) + 1

    @property
    def task_sizes(self) -> np.ndarray:
        return np.bincount(self.task, minlength=self.num_tasks)

    def tasks(self, rows: np.ndarray | None = None, y_dtype: Any = torch.float64,
              mean: np.ndarray | None = None, std: np.ndarray | None = None) -> list[Task]:
        """One :class:`Task` per task id from the selected ``rows`` (bool mask or indices), features
        optionally standardised by ``(x − mean)/std``; regression targets get shape (n, k) (k = 1: one target)."""
        sel = np.arange(len(self.y)) if rows is None else np.flatnonzero(rows) if rows.dtype == bool else rows
        x = self.x[sel]
        if mean is not None:
            x = (x - mean) / std
        out = []
        for t in range(self.num_tasks):
            m = self.task[sel] == t
            if not m.any():
                raise ValueError(f"task {t} has no rows in this selection.")
            yt = torch.as_tensor(self.y[sel][m])
            yt = yt.to(y_dtype).view(len(yt), -1) if y_dtype.is_floating_point else yt.to(y_dtype)
            out.append(Task(torch.as_tensor(x[m], dtype=torch.float64), yt, name=f"task{t}"))
        return out


def _root(path: str | os.PathLike | None) -> Path:
    return Path(path) if path is not None else data_root("multitask")


def load_multitask_npz(path: str | os.PathLike) -> MultitaskData:
    """Read a ``.npz`` with ``X``, ``y``, ``task``, ``task_sizes`` (+ extra arrays kept in ``extra``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"multitask file {str(path)!r} not found.")
    with np.load(path, allow_pickle=False) as f:
        missing = {"X", "y", "task"} - set(f.files)
        if missing:
            raise DatasetLayoutError(f"{path} lacks arrays {sorted(missing)} (needs X, y, task).")
        arrays = {k: f[k] for k in f.files}
    task = arrays.pop("task").astype(np.int64)
    data = MultitaskData(arrays.pop("X").astype(np.float64), arrays.pop("y").astype(np.float64), task,
                         [str(s) for s in arrays.pop("feature_names", [])], arrays)
    sizes = arrays.pop("task_sizes", None)
    if sizes is not None and not np.array_equal(np.asarray(sizes), data.task_sizes):
        raise DatasetLayoutError(f"{path}: task_sizes does not match bincount(task).")
    return data


def load_landmine(path: str | os.PathLike | None = None) -> MultitaskData:
    """Landmine detection: 29 tasks (fields), 9 features, binary target."""
    data = load_multitask_npz(_root(path) / "landmine.npz")
    data.y = data.y.astype(np.int64)
    return data


def load_computer_survey(path: str | os.PathLike | None = None, drop_constant: bool = True) -> MultitaskData:
    """Computer survey: 190 respondents, 13 ±1 attributes (the constant column dropped: models carry a bias);
    ``extra["profile"]`` (1..20) tells calibration (1–16) from validation (17–20)."""
    data = load_multitask_npz(_root(path) / "computer_survey.npz")
    if "profile" not in data.extra:
        raise DatasetLayoutError("computer_survey.npz lacks the 'profile' array.")
    if drop_constant and data.feature_names and data.feature_names[0] == "const":
        data.x, data.feature_names = data.x[:, 1:], data.feature_names[1:]
    return data


def load_parkinsons(path: str | os.PathLike | None = None, target: str = "total_UPDRS",
                    features: list[str] | None = None) -> MultitaskData:
    """Parkinson's telemonitoring: one task per patient (``subject#``), the 16 voice measures by default."""
    file = _root(path) / "parkinsons_updrs.csv"
    if not file.is_file():
        raise DatasetLayoutError(f"{str(file)!r} not found.")
    with open(file, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    features = features or PARKINSONS_VOICE
    if not rows:
        raise DatasetLayoutError(f"{file} is empty: it needs a header row (subject#, {target}, the voice measures) "
                                 f"and one row per recording.")
    head, body = rows[0], rows[1:]
    for col in ["subject#", target, *features]:
        if col not in head:
            raise DatasetLayoutError(f"{file}: column {col!r} missing (have {head}).")
    if not body:
        raise DatasetLayoutError(f"{file} has a header but no data rows.")
    arr = np.empty((len(body), len(head)))
    for n, row in enumerate(body, 2):  # line numbers as an editor shows them (the header is line 1)
        try:
            if len(row) != len(head):
                raise ValueError(f"{len(row)} fields, the header has {len(head)}")
            arr[n - 2] = [float(v) for v in row]
        except ValueError as e:
            raise DatasetLayoutError(f"{file}, row {n}: {e} (every field must be a number).") from None
    at = {name: i for i, name in enumerate(head)}
    subj = arr[:, at["subject#"]].astype(np.int64)
    _, task = np.unique(subj, return_inverse=True)
    return MultitaskData(arr[:, [at[c] for c in features]], arr[:, at[target]], task.astype(np.int64),
                         list(features), {"subject": subj})


def split_per_task(task: np.ndarray, frac: float, rng: np.random.Generator, min_rows: int = 2) -> np.ndarray:
    """A bool mask choosing round(frac·n_t) rows (at least ``min_rows``) of every task at random."""
    mask = np.zeros(len(task), dtype=bool)
    for t in np.unique(task):
        rows = np.flatnonzero(task == t)
        k = min(len(rows) - 1, max(min_rows, int(round(frac * len(rows)))))
        mask[rng.choice(rows, size=k, replace=False)] = True
    return mask
