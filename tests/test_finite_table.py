"""A multi-task table of one's own through ``metaprox train`` / ``metaprox eval``: the CLI equals the Python API
bitwise, metrics against a closed form, test rows never reach training or validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from metaprox import SGD
from metaprox.algorithms.finite import FiniteMMP
from metaprox.cli import main
from metaprox.data.splits import TEST, TRAIN, VAL, split_rows, standardize
from metaprox.data.table import read_table
from metaprox.store import MemoryStore
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSampler, TaskSet

SIZES = [9, 14, 30, 12, 22]


def write_table(path: Path, test_noise: float | None = None) -> Path:
    """Per-task linear data; ``test_noise``: overwrite the test rows of the config's split with garbage."""
    rng = np.random.default_rng(1)
    rows, task = [], []
    for t, n in enumerate(SIZES):
        w = np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=3)
        x = rng.normal(size=(n, 3)) * [1.0, 3.0, 0.2] + [0.0, 5.0, 1.0]
        y = x @ w + t + 0.1 * rng.normal(size=n)
        rows += [[f"t{t}", *xi, yi] for xi, yi in zip(x, y, strict=True)]
        task += [t] * n
    if test_noise is not None:
        labels = split_rows(np.array(task), 0.75, 0.25, 3)
        for i in np.flatnonzero(labels == TEST):
            rows[i][1:] = list(test_noise * rng.normal(size=4))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "f1", "f2", "f3", "target"])
        w.writerows(rows)
    return path


def write_config(path: Path, table: Path, **over: str | None) -> Path:
    """A finite-run config for ``table``; ``over`` replaces keys (None: leave the key out)."""
    lines = {"algorithm": '"finite_mmp"', "seed": "0", "task.family": '"multitask"', "task.file": f'"{table}"',
             "task.task_column": '"name"', "task.target": '"target"', "task.val_frac": "0.25",
             "task.test_frac": "0.25", "task.split_seed": "3", "model.kind": '"linear"',
             "prox.lam": '{ weight = 2.0, bias = "private" }', "finite.sample": '"without_replacement"',
             "inner.solver": '"sgd"', "inner.lr": "0.05", "inner.steps": "5", "outer.lr": "0.3",
             "outer.meta_batch": "2", "outer.steps": "6", "outer.schedule": '"constant"', "log.every": "2",
             "log.checkpoint_every": "3", "log.progress": "false", "log.tensorboard": '"false"',
             "eval.metrics": '["rmse", "mae", "r2", "explained_variance"]', **over}
    sections: dict[str, list[str]] = {"": []}
    for k, v in lines.items():
        if v is None:
            continue
        sec, _, key = k.rpartition(".")
        sections.setdefault(sec, []).append(f"{key} = {v}")
    text = "\n".join(sections.pop("")) + "\n" + "".join(f"[{s}]\n" + "\n".join(v) + "\n" for s, v in sections.items())
    path.write_text(text)
    return path


def state(run: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((run / "checkpoint.json").read_text())
    out = {k: v for k, v in load_file(run / meta["tensors"]).items() if k.startswith("params/")}
    from metaprox.store import MemmapStore

    store = MemmapStore.open(run / "store-rank0-of-1")
    out["rows"] = store.read(np.arange(len(SIZES)), torch.zeros(store.layout.numel, dtype=torch.float64))[0]
    return out


def test_cli_run_equals_the_python_api_bitwise(tmp_path, capsys):
    table = write_table(tmp_path / "t.csv")
    cfg = write_config(tmp_path / "c.toml", table)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    cli = state(tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert stored["threads"] == 1  # a small linear model: one thread

    # the same run written against the library
    data = read_table(table, task_column="name", target="target")
    labels = split_rows(data.task, 0.75, 0.25, 3)
    x = standardize(data.x, data.task, labels == TRAIN, "global")
    tasks = [Task(torch.as_tensor(x[(data.task == t) & (labels == TRAIN)]),
                  torch.as_tensor(data.y[(data.task == t) & (labels == TRAIN)]).view(-1, 1)) for t in range(5)]

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    learner = FiniteMMP(model, TaskSet(tasks), "mse", lam={"weight": 2.0, "bias": "private"},
                        inner=SGD(lr=0.05, steps=5), sampler=TaskSampler(5, 2, seed=0),
                        meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.3), outer_lr=0.3, total_steps=6, seed=0)
    learner.store = MemoryStore(learner.layout, 5, torch.float32)  # the CLI's memmap store keeps float32 rows
    for _ in range(6):
        learner.step(monitor=False)
    assert torch.equal(cli["params/weight"], model.weight.detach()) and torch.equal(cli["params/bias"],
                                                                                     model.bias.detach())
    assert torch.equal(cli["rows"], learner.rows(np.arange(5)))

    # evaluation on validation rows: every metric from the stored per-task parameters by hand
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--split", "val", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((tmp_path / "run" / "eval-val.json").read_text())
    preds, ys = [], []
    for t in range(5):
        rows = (data.task == t) & (labels == VAL)
        v = learner.rows([t])[0].numpy()  # the task's own [weight (3), bias]
        p = x[rows] @ v[:3] + v[3]
        preds.append(p)
        ys.append(data.y[rows])
        r = res["eval"]["per_task"][t]
        assert r["task"] == f"t{t}" and r["rows"] == rows.sum()
        assert r["rmse"] == pytest.approx(np.sqrt(np.mean((p - data.y[rows]) ** 2)), rel=1e-12)
        ss_tot = np.sum((data.y[rows] - data.y[rows].mean()) ** 2)
        assert r["r2"] == pytest.approx(1 - np.sum((data.y[rows] - p) ** 2) / ss_tot, rel=1e-10)
    p, y = np.concatenate(preds), np.concatenate(ys)
    assert res["eval"]["pooled"]["mae"] == pytest.approx(np.mean(np.abs(p - y)), rel=1e-12)
    assert res["eval"]["pooled"]["explained_variance"] == pytest.approx(1 - np.var(y - p) / np.var(y), rel=1e-10)
    assert res["val"]["metric"] == "rmse" and res["val"]["value"] == res["eval"]["pooled"]["rmse"]
    header = (tmp_path / "run" / "tasks-val.csv").read_text().splitlines()[0]
    assert header == "task,rows,train_rows,rmse,mae,r2,explained_variance"


def test_test_rows_never_reach_training_or_validation(tmp_path):
    """The test rows' features and targets replaced by garbage: same center, same per-task rows, same
    validation metrics — only the test metrics change."""
    runs = {}
    for name, noise in (("clean", None), ("garbage", 1e3)):
        cfg = write_config(tmp_path / f"{name}.toml", write_table(tmp_path / f"{name}.csv", noise))
        assert main(["train", str(cfg), "--out", str(tmp_path / name), "--no-eval"]) == 0
        for split in ("val", "test"):
            assert main(["eval", str(tmp_path / name), "--split", split]) == 0
        runs[name] = state(tmp_path / name)
    a, b = runs["clean"], runs["garbage"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    val = [json.loads((tmp_path / n / "eval-val.json").read_text())["eval"] for n in ("clean", "garbage")]
    assert val[0]["per_task"] == val[1]["per_task"]
    test = [json.loads((tmp_path / n / "eval.json").read_text())["eval"]["pooled"]["rmse"] for n in runs]
    assert test[1] > 10 * test[0]  # the garbage is there, and only the test split sees it


def test_cli_errors_name_the_problem(tmp_path, capsys):
    table = write_table(tmp_path / "t.csv")
    cfg = write_config(tmp_path / "c.toml", table, **{"task.target": '"sales"'})
    assert main(["train", str(cfg), "--out", str(tmp_path / "r1")]) == 2
    assert "metaprox: error:" in (err := capsys.readouterr().err) and "target column 'sales' not found" in err
    cfg = write_config(tmp_path / "c.toml", table, **{"task.val_frac": "0.0"})
    assert main(["train", str(cfg), "--out", str(tmp_path / "r2"), "--no-eval"]) == 0
    assert main(["eval", str(tmp_path / "r2"), "--split", "val"]) == 2
    assert "no 'val' rows: set task.val_frac > 0" in capsys.readouterr().err
    cfg = write_config(tmp_path / "c.toml", table, **{"task.features": '"f1"'})
    assert main(["train", str(cfg), "--out", str(tmp_path / "r3")]) == 2
    assert "task.features = 'f1': must be a list of column names" in capsys.readouterr().err


def write_binary(path: Path, one_class_task: bool = False) -> Path:
    rng = np.random.default_rng(2)
    rows = []
    for t in range(4):
        x = rng.normal(size=(40, 2))
        y = (x[:, 0] + 0.5 * t + 0.3 * rng.normal(size=40) > 0).astype(int)
        if one_class_task and t == 2:
            y[:] = 1
        rows += [[f"field{t}", *xi, "mine" if yi else "clear"] for xi, yi in zip(x, y, strict=True)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["field", "a", "b", "label"])
        w.writerows(rows)
    return path


def test_binary_table_auc_accuracy_log_loss_and_single_class_error(tmp_path, capsys):
    over = {"task.task_column": '"field"', "task.target": '"label"', "task.task_type": '"binary"',
            "eval.metrics": '["auc", "accuracy", "log_loss"]', "prox.lam": "1.0", "outer.steps": "3"}
    cfg = write_config(tmp_path / "c.toml", write_binary(tmp_path / "b.csv"), **over)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    res = json.loads((tmp_path / "run" / "eval-val.json").read_text())
    assert res["val"]["metric"] == "auc" and res["val"]["value"] == res["eval"]["task_mean"]["auc"]
    assert all(0 <= r["auc"] <= 1 and 0 <= r["accuracy"] <= 1 and r["log_loss"] > 0 for r in res["eval"]["per_task"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--split", "val", "--set", 'eval.metrics=["rmse"]']) == 2
    assert "for a binary task set choose from ['accuracy', 'log_loss', 'auc']" in capsys.readouterr().err
    cfg = write_config(tmp_path / "c1.toml", write_binary(tmp_path / "b1.csv", one_class_task=True), **over)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run1"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "metaprox: error:" in err and "task 'field2' has only class [1] among its val rows" in err


def test_multiclass_table_with_a_split_column(tmp_path):
    """Three classes, the split given per row (NPZ with text columns): train/val/test exactly as the column says."""
    rng = np.random.default_rng(5)
    n = 60
    task = np.repeat(["north", "south", "east"], n)
    x = rng.normal(size=(3 * n, 2))
    label = np.array(["low", "mid", "high"])[np.digitize(x[:, 0] + 0.2 * rng.normal(size=3 * n), [-0.5, 0.5])]
    split = np.tile(np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10), 3)
    np.savez(tmp_path / "m.npz", region=task, a=x[:, 0], b=x[:, 1], label=label, split=split)
    over = {"task.file": f'"{tmp_path / "m.npz"}"', "task.task_column": '"region"', "task.target": '"label"',
            "task.task_type": '"multiclass"', "task.split_column": '"split"', "task.val_frac": None,
            "task.test_frac": None, "eval.metrics": '["accuracy", "log_loss"]', "prox.lam": "1.0",
            "inner.lr": "0.5", "inner.steps": "20", "outer.steps": "3"}
    cfg = write_config(tmp_path / "c.toml", tmp_path / "m.npz", **over)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    res = json.loads((tmp_path / "run" / "eval-val.json").read_text())["eval"]
    assert res["rows"] == 30 and [r["train_rows"] for r in res["per_task"]] == [40, 40, 40]
    assert [r["task"] for r in res["per_task"]] == ["north", "south", "east"]  # order of first appearance
    assert res["pooled"]["accuracy"] > 0.6  # three classes: chance is 1/3
    assert main(["eval", str(tmp_path / "run"), "--split", "test"]) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["eval"]["rows"] == 30
