"""The finite task set of a config (``task.family = "multitask"``): read, split, standardise, one Task per task.

Two ways in, one path after reading:

- ``task.file`` — a table of one's own (:func:`metaprox.data.table.read_table`): ``task.task_column``,
  ``task.target`` (a column or a list), ``task.features`` (a list, or all other columns), ``task.task_type``
  (``regression`` / ``binary`` / ``multiclass``), optional ``task.split_column`` (train/val/test per row);
- ``task.dataset`` — a named preset read from ``task.data_path``: ``landmine`` (binary), ``computer_survey``
  (regression; its fixed protocol: profiles 17–20 are the test rows) and ``parkinsons`` (regression).

Rows (:mod:`metaprox.data.splits`): test rows drawn per task with ``task.test_frac`` (None: ``1 − task.train_frac``)
and ``task.split_seed``, validation rows with ``task.val_frac`` from the rest. Features are standardised with
statistics of the training rows only (``task.standardize``: ``global``, ``per_task`` or ``none``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metaprox.config import ConfigError
from metaprox.data.multitask import MultitaskData
from metaprox.data.splits import SPLITS, TRAIN, check_split_sizes, labels_from_names, split_rows, standardize
from metaprox.tasks.task import Task

__all__ = ["FiniteData", "load_finite_data", "PRESETS"]

PRESETS = {"landmine": "binary", "computer_survey": "regression", "parkinsons": "regression"}


@dataclass
class FiniteData:
    """A finite task set with its split: standardised data, the row labels, the task type and the task names."""

    data: MultitaskData
    labels: np.ndarray
    task_type: str
    names: list[str]
    source: str

    @property
    def classify(self) -> bool:
        return self.task_type != "regression"

    @property
    def outputs(self) -> int:
        """Model outputs: one logit per class, or one value per regression target."""
        if self.classify:
            return int(self.data.y.max()) + 1 if "classes" not in self.data.extra else len(self.data.extra["classes"])
        return 1 if self.data.y.ndim == 1 else int(self.data.y.shape[1])

    def has(self, split: str) -> bool:
        return bool((self.labels == SPLITS[split]).any())

    def rows(self, split: str) -> np.ndarray:
        """Bool mask of the rows of ``split`` (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
        return self.labels == SPLITS[split]

    def tasks(self, split: str) -> list[Task]:
        """One :class:`Task` per task from its rows of ``split`` (class ids int64, regression targets (n, k))."""
        if not self.has(split):
            raise ConfigError(f"{self.source} has no {split!r} rows: set task.val_frac > 0 for a validation split"
                              if split == "val" else f"{self.source} has no {split!r} rows (task.test_frac = 0?).")
        return self.data.tasks(self.rows(split), torch.int64 if self.classify else torch.float64)


def _check_keys(t: dict[str, Any]) -> None:
    """Types of the table keys (their defaults are None, so the config schema cannot check them)."""
    def names(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    checks = {"file": lambda v: isinstance(v, str), "split_column": lambda v: isinstance(v, str),
              "target": lambda v: isinstance(v, str) or (names(v) and v), "features": names,
              "task_type": lambda v: v in ("regression", "binary", "multiclass"),
              "test_frac": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
    wants = {"file": "a path string", "split_column": "a column name", "target": "a column name or a list of them",
             "features": "a list of column names", "task_type": "'regression', 'binary' or 'multiclass'",
             "test_frac": "a number in [0, 1)"}
    for key, ok in checks.items():
        if t[key] is not None and not ok(t[key]):
            raise ConfigError(f"task.{key} = {t[key]!r}: must be {wants[key]}.")


def _read(cfg: dict[str, Any]) -> tuple[MultitaskData, str, str, np.ndarray | None]:
    """(data, task type, source name, fixed test mask or None) of the config's table or preset."""
    from metaprox.data import multitask
    from metaprox.data.table import read_table

    t = cfg["task"]
    _check_keys(t)
    if t["file"] is not None:
        data = read_table(t["file"], t["task_column"], t["target"] or "y", t["features"],
                          t["task_type"] or "regression", t["split_column"])
        return data, t["task_type"] or "regression", str(t["file"]), None
    name = t["dataset"]
    if name not in PRESETS:
        raise ConfigError(f"task.dataset = {name!r} for family 'multitask': set task.file to a table of your own "
                          f"(.csv, .npz, .parquet), or choose a preset {tuple(PRESETS)}.")
    for key in ("target", "features", "split_column"):
        if t[key] is not None:
            raise ConfigError(f"task.{key} is for tables (task.file); the preset {name!r} fixes its columns.")
    if t["task_type"] not in (None, PRESETS[name]):
        raise ConfigError(f"task.task_type = {t['task_type']!r}, but the preset {name!r} is {PRESETS[name]}.")
    loader = {"landmine": multitask.load_landmine, "computer_survey": multitask.load_computer_survey,
              "parkinsons": multitask.load_parkinsons}[name]
    data = loader(t["data_path"])
    fixed = data.extra["profile"] > 16 if name == "computer_survey" else None
    return data, PRESETS[name], name, fixed


def load_finite_data(cfg: dict[str, Any]) -> FiniteData:
    """The config's finite task set, split and standardised (see the module doc)."""
    t = cfg["task"]
    data, task_type, source, fixed = _read(cfg)
    names = [str(s) for s in data.extra.get("task_name", [f"task{i}" for i in range(data.num_tasks)])]
    if "split" in data.extra:
        if t["test_frac"] is not None or t["val_frac"] > 0:
            raise ConfigError("task.split_column gives the split; remove task.test_frac / task.val_frac.")
        labels = labels_from_names(data.extra["split"])
    else:
        keep = t["train_frac"] if t["test_frac"] is None else 1.0 - t["test_frac"]
        if fixed is not None and t["test_frac"] is not None:
            raise ConfigError(f"{source} has a fixed test protocol; remove task.test_frac.")
        labels = split_rows(data.task, keep, t["val_frac"], t["split_seed"], fixed)
    check_split_sizes(data.task, labels, names, source)
    train = labels == TRAIN
    x = standardize(data.x, data.task, train, t["standardize"])
    std = MultitaskData(x, data.y, data.task, data.feature_names, data.extra)
    return FiniteData(std, labels, task_type, names, source)
