"""Per-task train / validation / test rows of a finite task set, and feature standardisation fitted on training rows.

Every row gets a label: ``TRAIN`` (the task's data term), ``VAL`` (for choosing settings: ``metaprox eval RUN
--split val``) or ``TEST`` (reported once, never used for training or selection). The split depends only on the
task ids, the fractions and the seed — never on feature or target values — so changing the test rows' values
cannot change anything the training or the validation sees.

Random splits (:func:`split_rows`) draw, per task, the test rows first (exactly as
:func:`~metaprox.data.multitask.split_per_task` with ``keep_frac`` = ``task.train_frac`` or ``1 − task.test_frac``
kept, so the presets' earlier ``train_frac`` splits are reproduced row for row), then the validation rows among
the remaining ones (``round(val_frac·n_t)``, at least one when ``val_frac > 0``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from metaprox.config import ConfigError
from metaprox.data.multitask import split_per_task

__all__ = ["TRAIN", "VAL", "TEST", "SPLITS", "split_rows", "labels_from_names", "check_split_sizes", "standardize",
           "STANDARDIZE"]

TRAIN, VAL, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "val": VAL, "test": TEST}
STANDARDIZE = ("global", "per_task", "none")


def labels_from_names(names: Iterable[Any]) -> np.ndarray:
    """``train``/``val``/``test`` strings → labels."""
    return np.array([SPLITS[str(n)] for n in names], dtype=np.int8)


def split_rows(task: np.ndarray, keep_frac: float, val_frac: float, seed: int,
               fixed_test: np.ndarray | None = None) -> np.ndarray:
    """Labels (N,) int8 of a random per-task split: ``keep_frac`` of each task's rows (at least two) are kept
    from the test split (``keep_frac = 1``: no test rows; ``fixed_test``: a bool mask of given test rows
    instead), then ``val_frac`` of its rows (at least one) are drawn from the kept ones for validation."""
    if not 0.0 < keep_frac <= 1.0 or not 0.0 <= val_frac < keep_frac:
        raise ConfigError(f"task.test_frac = {1.0 - keep_frac:.6g} and task.val_frac = {val_frac}: each must be in "
                          f"[0, 1) and their sum < 1 (the rest are training rows).")
    rng = np.random.default_rng(seed)
    labels = np.full(len(task), TRAIN, dtype=np.int8)
    if fixed_test is not None:
        labels[fixed_test] = TEST
    elif keep_frac < 1.0:
        labels[~split_per_task(task, keep_frac, rng)] = TEST
    if val_frac > 0:
        for t in np.unique(task):
            rows = np.flatnonzero((task == t) & (labels == TRAIN))
            k = min(len(rows) - 1, max(1, int(round(val_frac * (task == t).sum()))))
            if k > 0:
                labels[rng.choice(rows, size=k, replace=False)] = VAL
    return labels


def check_split_sizes(task: np.ndarray, labels: np.ndarray, names: Sequence[str], where: str) -> None:
    """Every task needs ≥ 1 training row and ≥ 1 row in each split that exists at all (else it could not be
    trained or scored there): the error names the task and its row counts."""
    present = [s for s, lab in SPLITS.items() if s == "train" or bool((labels == lab).any())]
    counts = np.stack([np.bincount(task[labels == SPLITS[s]], minlength=len(names)) for s in present], axis=1)
    bad = np.flatnonzero((counts == 0).any(axis=1))
    if len(bad):
        t = int(bad[0])
        have = ", ".join(f"{s} {c}" for s, c in zip(present, counts[t], strict=True))
        raise ConfigError(f"{where}: task {names[t]!r} has {int(counts[t].sum())} row(s) ({have}); every task needs "
                          f"at least one row in each of {present} ({len(bad)} task(s) fall short). Drop tasks that "
                          f"small, or change task.val_frac / task.test_frac (or the split column).")


def standardize(x: np.ndarray, task: np.ndarray, train: np.ndarray, mode: str) -> np.ndarray:
    """``(x − mean)/std`` with mean and std fitted on the training rows only: over all tasks (``"global"``; a
    constant column gets std 1e-12, as before), per task (``"per_task"``; a column constant within a task's
    training rows keeps scale 1) or not at all (``"none"``)."""
    if mode == "none":
        return x
    if mode == "global":
        mean, std = x[train].mean(0), x[train].std(0) + 1e-12
        return (x - mean) / std
    if mode != "per_task":
        raise ConfigError(f"task.standardize = {mode!r}: choose one of {STANDARDIZE}.")
    out = np.empty_like(x)
    for t in np.unique(task):
        rows = task == t
        fit = x[rows & train]
        mean, std = fit.mean(0), fit.std(0)
        out[rows] = (x[rows] - mean) / np.where(std > 0, std, 1.0)
    return out
