"""The multi-task table reader and the per-task splits: formats agree, bad input names file, column and row."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from metaprox.config import ConfigError
from metaprox.data.multitask import split_per_task
from metaprox.data.splits import TEST, TRAIN, VAL, check_split_sizes, split_rows, standardize
from metaprox.data.table import TableError, read_table


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def small(path, n=(3, 5)):
    rows = []
    for t, k in enumerate(n):
        rows += [[f"shop{t}", f"{i * 0.5 + t}", f"{i % 2}", f"{10 * t + i}.5"] for i in range(k)]
    return write_csv(path, ["shop", "a", "b", "y"], rows)


def test_csv_npz_parquet_read_the_same_table(tmp_path):
    data = read_table(small(tmp_path / "t.csv"), task_column="shop", target="y")
    assert data.feature_names == ["a", "b"] and data.task.tolist() == [0] * 3 + [1] * 5
    assert data.extra["task_name"].tolist() == ["shop0", "shop1"] and data.y[3] == 10.5
    np.savez(tmp_path / "t.npz", shop=np.array(["shop0"] * 3 + ["shop1"] * 5), a=data.x[:, 0], b=data.x[:, 1],
             y=data.y)
    npz = read_table(tmp_path / "t.npz", task_column="shop", target="y")
    assert np.array_equal(npz.x, data.x) and np.array_equal(npz.y, data.y) and np.array_equal(npz.task, data.task)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"shop": ["shop0"] * 3 + ["shop1"] * 5, "a": data.x[:, 0], "b": data.x[:, 1],
                             "y": data.y}), tmp_path / "t.parquet")
    par = read_table(tmp_path / "t.parquet", task_column="shop", target="y")
    assert np.array_equal(par.x, data.x) and np.array_equal(par.y, data.y) and np.array_equal(par.task, data.task)


def test_feature_list_targets_and_classes(tmp_path):
    path = small(tmp_path / "t.csv")
    two = read_table(path, task_column="shop", target=["y", "a"], features=["b"])
    assert two.y.shape == (8, 2) and two.feature_names == ["b"]
    binary = read_table(path, task_column="shop", target="b", features=["a"], task_type="binary")
    assert binary.y.dtype == np.int64 and binary.extra["classes"].tolist() == ["0", "1"]
    rows = [["s", "1.0", lab] for lab in ("10", "9", "2", "10")]
    multi = read_table(write_csv(tmp_path / "m.csv", ["task", "x", "label"], rows), target="label",
                       task_type="multiclass")
    assert multi.extra["classes"].tolist() == ["2", "9", "10"] and multi.y.tolist() == [2, 1, 0, 2]  # numeric order


@pytest.mark.parametrize("header,rows,kw,match", [
    (["shop", "a", "y"], [["s", "1", "2"]], {"task_column": "store"}, r"t.csv: task column 'store' not found"),
    (["shop", "a", "y"], [["s", "1", "2"]], {"target": "sales"}, r"t.csv: target column 'sales' not found"),
    (["shop", "a", "y"], [["s", "1", "2"], ["s", "x1", "2"]], {}, r"t.csv: column 'a', line 3: 'x1' is not a number"),
    (["shop", "a", "y"], [["s", "1", "2"], ["s", "nan", "2"]], {}, r"column 'a', line 3: value nan \(NaN"),
    (["shop", "a", "y"], [["s", "1", ""]], {}, r"column 'y', line 2: '' is not a number"),
    (["shop", "a", "a", "y"], [["s", "1", "1", "2"]], {}, r"t.csv: duplicate column name 'a'"),
    (["shop", "a", "y"], [], {}, r"t.csv: the file has a header but no data rows"),
    (["shop", "a", "y"], [["s", "1"]], {}, r"t.csv: line 2 has 2 fields, the header has 3"),
    (["shop", "a", "y"], [["s", "1", "0"], ["s", "2", "0"]], {"task_type": "binary"}, r"column 'y' has 1 distinct"),
    (["shop", "a", "y"], [["s", "1", "0"]], {"features": ["a", "y"]}, r"listed as features and also used"),
])
def test_bad_tables_name_file_column_and_row(tmp_path, header, rows, kw, match):
    path = write_csv(tmp_path / "t.csv", header, rows)
    with pytest.raises(TableError, match=match):
        read_table(path, **{"task_column": "shop", "target": "y", **kw})


def test_empty_missing_and_pickled_files(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(TableError, match="e.csv: the file is empty"):
        read_table(tmp_path / "e.csv")
    with pytest.raises(TableError, match="not found"):
        read_table(tmp_path / "none.csv")
    np.savez(tmp_path / "o.npz", task=np.array(["a", 1], dtype=object), y=np.zeros(2))
    with pytest.raises(TableError, match="without unpickling"):
        read_table(tmp_path / "o.npz")
    assert issubclass(TableError, ConfigError)  # the CLI reports it as `metaprox: error: …`


def test_random_split_reproduces_the_presets_train_frac_split():
    task = np.repeat(np.arange(7), [5, 9, 3, 20, 2, 11, 6])
    for frac in (0.2, 0.5, 0.75):
        old = split_per_task(task, frac, np.random.default_rng(3))
        labels = split_rows(task, frac, 0.0, 3)
        assert np.array_equal(labels == TRAIN, old) and np.array_equal(labels == TEST, ~old)


def test_validation_rows_come_from_the_kept_rows_and_sizes_are_checked():
    task = np.repeat(np.arange(4), [10, 10, 40, 5])
    labels = split_rows(task, 0.8, 0.2, 0)
    for t, n in enumerate([10, 10, 40, 5]):
        got = np.bincount(labels[task == t], minlength=3)
        assert got[VAL] == max(1, round(0.2 * n)) and got[TRAIN] >= 1 and got[TEST] >= 1
    assert np.array_equal(split_rows(task, 0.8, 0.2, 0), labels)  # the seed fixes it
    tiny = np.repeat(np.arange(2), [10, 2])
    with pytest.raises(ConfigError, match=r"x.csv: task 'b' has 2 row\(s\) \(train 1, val 0, test 1\)"):
        check_split_sizes(tiny, split_rows(tiny, 0.6, 0.2, 0), ["a", "b"], "x.csv")


def test_standardisation_uses_training_rows_only():
    rng = np.random.default_rng(0)
    task = np.repeat(np.arange(2), 6)
    x = rng.normal(size=(12, 2))
    train = np.arange(12) % 3 != 0
    moved = x.copy()
    moved[~train] += 100.0  # held-out rows do not change the statistics
    for mode in ("global", "per_task"):
        a, b = standardize(x, task, train, mode), standardize(moved, task, train, mode)
        assert np.array_equal(a[train], b[train])
    per = standardize(x, task, train, "per_task")
    for t in range(2):
        fit = per[(task == t) & train]
        assert np.allclose(fit.mean(0), 0) and np.allclose(fit.std(0), 1)
