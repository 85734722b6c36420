"""A multi-task table of one's own: one row per example, a task column, target column(s), feature columns.

    data = read_table("examples/byo_tasks.csv", task_column="school", target=["score"])

Formats, by file suffix: ``.csv`` (stdlib :mod:`csv`, a header row), ``.npz`` (one 1-D array per column;
``allow_pickle=False``, so text columns must be fixed-width unicode, never object arrays) and ``.parquet``
(needs the optional extra ``metaprox[parquet]``, i.e. pyarrow). Tasks are numbered in order of first appearance
of their label; the labels are kept (``extra["task_name"]``).

Task types: ``"regression"`` (float targets, one or more columns), ``"binary"`` (exactly two labels, mapped to
0/1 in sorted order) and ``"multiclass"`` (labels mapped to 0..C−1 in sorted order; numeric labels sort as
numbers). The class labels are kept (``extra["classes"]``).

Every problem with the file is a :class:`TableError` (a :class:`~metaprox.config.ConfigError`: the CLI prints
it as ``metaprox: error: …``) that names the file, the column and — for a bad value — the row (the CSV line
number, or the 0-based row index of an NPZ/Parquet column).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metaprox.config import ConfigError
from metaprox.data.multitask import MultitaskData

__all__ = ["TableError", "read_table", "read_columns", "TASK_TYPES"]

TASK_TYPES = ("regression", "binary", "multiclass")


class TableError(ConfigError):
    """A multi-task table cannot be used as given (the message names file, column and row)."""


class _Columns:
    """Raw columns of a table: names in file order, values (str lists or numpy arrays), how rows are named."""

    def __init__(self, path: Path, names: list[str], values: Mapping[str, Sequence[Any] | np.ndarray], csv_lines: bool):
        self.path, self.names, self.values, self.csv_lines = path, names, values, csv_lines
        self.rows = len(next(iter(values.values()))) if values else 0

    def where(self, column: str, i: int) -> str:
        row = f"line {i + 2}" if self.csv_lines else f"row {i}"
        return f"{self.path}: column {column!r}, {row}"


def _check_names(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise TableError(f"{path}: duplicate column name {n!r}; every column needs its own name.")
        seen.add(n)


def _read_csv(path: Path) -> _Columns:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise TableError(f"{path}: the file is empty (expected a header row of column names, then data rows).")
    head = [c.strip() for c in rows[0]]
    _check_names(path, head)
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    if not body:
        raise TableError(f"{path}: the file has a header but no data rows.")
    for i, r in enumerate(rows[1:]):
        if any(cell.strip() for cell in r) and len(r) != len(head):
            raise TableError(f"{path}: line {i + 2} has {len(r)} fields, the header has {len(head)}.")
    cols = {n: [r[j].strip() for r in body] for j, n in enumerate(head)}
    if len(body) != len(rows) - 1:  # blank lines inside the file would shift the line numbers of errors
        raise TableError(f"{path}: blank line(s) between data rows; remove them.")
    return _Columns(path, head, cols, csv_lines=True)


def _read_npz(path: Path) -> _Columns:
    try:
        with np.load(path, allow_pickle=False) as f:
            values = {k: f[k] for k in f.files}
    except ValueError as e:  # object arrays need pickle, which is never used
        raise TableError(f"{path}: cannot read without unpickling ({e}); store text columns as fixed-width "
                         f"unicode arrays (np.array([...], dtype=str)), not object arrays.") from e
    if not values:
        raise TableError(f"{path}: the file is empty (expected one 1-D array per column).")
    lengths = {k: v.shape for k, v in values.items()}
    if any(len(s) != 1 for s in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
        raise TableError(f"{path}: every array must be one 1-D column of the same length, got shapes {lengths}.")
    if next(iter(lengths.values()))[0] == 0:
        raise TableError(f"{path}: the columns have no rows.")
    return _Columns(path, list(values), values, csv_lines=False)


def _read_parquet(path: Path) -> _Columns:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise TableError(f"{path}: reading Parquet needs pyarrow (pip install 'metaprox[parquet]'), or save the "
                         f"table as CSV/NPZ.") from e
    table = pq.read_table(path)
    names = list(table.column_names)
    _check_names(path, names)
    if not names or table.num_rows == 0:
        raise TableError(f"{path}: the file is empty (no columns or no rows).")
    values = {n: np.asarray(table.column(i).to_numpy(zero_copy_only=False)) for i, n in enumerate(names)}
    return _Columns(path, names, values, csv_lines=False)


def read_columns(path: str | os.PathLike) -> _Columns:
    """The raw columns of a ``.csv``, ``.npz`` or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"table file {str(path)!r} not found (task.file is read relative to the current "
                         f"directory).")
    readers = {".csv": _read_csv, ".npz": _read_npz, ".parquet": _read_parquet}
    if path.suffix.lower() not in readers:
        raise TableError(f"{path}: unknown table format {path.suffix!r}; use .csv, .npz or .parquet.")
    return readers[path.suffix.lower()](path)


def _numbers(cols: _Columns, name: str) -> np.ndarray:
    """A column as float64; a non-numeric, empty or NaN/inf cell is an error naming its row."""
    raw = cols.values[name]
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "biuf":
        out = raw.astype(np.float64)
    else:
        out = np.empty(cols.rows)
        for i, cell in enumerate(raw):
            try:
                out[i] = float(cell)
            except (TypeError, ValueError):
                raise TableError(f"{cols.where(name, i)}: {str(cell)!r} is not a number.") from None
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise TableError(f"{cols.where(name, int(bad[0]))}: value {out[bad[0]]} (NaN or infinite; "
                         f"{len(bad)} such cell(s) in this column). Drop or impute those rows first.")
    return out


def _labels(cols: _Columns, name: str) -> list[str]:
    raw = cols.values[name]
    out = [str(v) for v in (raw.tolist() if isinstance(raw, np.ndarray) else raw)]
    for i, v in enumerate(out):
        if v == "" or v.lower() == "nan":
            raise TableError(f"{cols.where(name, i)}: empty label.")
    return out


def _class_ids(cols: _Columns, name: str, task_type: str) -> tuple[np.ndarray, list[str]]:
    labels = _labels(cols, name)
    distinct = set(labels)
    try:
        classes = sorted(distinct, key=float)
    except ValueError:
        classes = sorted(distinct)
    if task_type == "binary" and len(classes) != 2:
        raise TableError(f"{cols.path}: column {name!r} has {len(classes)} distinct label(s) {classes[:5]}; "
                         f"task_type = 'binary' needs exactly two (or use 'multiclass'/'regression').")
    if len(classes) < 2:
        raise TableError(f"{cols.path}: column {name!r} holds one class only ({classes}); nothing to classify.")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in labels], dtype=np.int64), classes


def _require(cols: _Columns, names: Sequence[str], role: str) -> None:
    for n in names:
        if n not in cols.values:
            raise TableError(f"{cols.path}: {role} column {n!r} not found; the columns are {cols.names}.")


def read_table(path: str | os.PathLike, task_column: str = "task", target: str | Sequence[str] = "y",
               features: Sequence[str] | None = None, task_type: str = "regression",
               split_column: str | None = None) -> MultitaskData:
    """Read a multi-task table into :class:`~metaprox.data.multitask.MultitaskData`.

    Args:
        path: a ``.csv``, ``.npz`` or ``.parquet`` file.
        task_column: the column whose value names an example's task (any labels: ids, names).
        target: the target column, or a list of them (regression only).
        features: the feature columns (numbers); ``None``: every other column (not task, target or split).
        task_type: ``"regression"``, ``"binary"`` or ``"multiclass"``.
        split_column: an optional column of ``train`` / ``val`` / ``test`` per row (kept in ``extra["split"]``).

    Returns:
        ``x`` (N, d) float64, ``y`` (N,) or (N, k) float64 (regression) / int64 class ids, ``task`` (N,) ids,
        ``extra``: ``task_name`` (the task labels, by id), ``classes`` (classification), ``split``.
    """
    if task_type not in TASK_TYPES:
        raise TableError(f"task.task_type = {task_type!r}: choose one of {TASK_TYPES}.")
    cols = read_columns(path)
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise TableError(f"{cols.path}: no target column given (task.target).")
    if len(targets) > 1 and task_type != "regression":
        raise TableError(f"{cols.path}: {len(targets)} target columns; only regression takes several.")
    _require(cols, [task_column], "task")
    _require(cols, targets, "target")
    if split_column is not None:
        _require(cols, [split_column], "split")
    taken = {task_column, *targets, *([split_column] if split_column else [])}
    if features is None:
        features = [n for n in cols.names if n not in taken]
    else:
        features = list(features)
        _require(cols, features, "feature")
        overlap = sorted(taken & set(features))
        if overlap:
            raise TableError(f"{cols.path}: column(s) {overlap} are listed as features and also used as task, "
                             f"target or split column.")
    if not features:
        raise TableError(f"{cols.path}: no feature columns (every column is the task, target or split column).")
    x = np.stack([_numbers(cols, n) for n in features], axis=1)
    names = _labels(cols, task_column)
    order: dict[str, int] = {}
    task = np.array([order.setdefault(v, len(order)) for v in names], dtype=np.int64)
    extra: dict[str, np.ndarray] = {"task_name": np.array(list(order), dtype=str)}
    if task_type == "regression":
        ys = [_numbers(cols, n) for n in targets]
        y = ys[0] if len(ys) == 1 else np.stack(ys, axis=1)
    else:
        y, classes = _class_ids(cols, targets[0], task_type)
        extra["classes"] = np.array(classes, dtype=str)
    if split_column is not None:
        split = np.array([s.lower() for s in _labels(cols, split_column)], dtype=str)
        bad = np.flatnonzero(~np.isin(split, ["train", "val", "test"]))
        if len(bad):
            raise TableError(f"{cols.where(split_column, int(bad[0]))}: split {split[bad[0]]!r}; use train, val "
                             f"or test.")
        extra["split"] = split
    return MultitaskData(x, y, task, list(features), extra)
