"""Metrics of a finite run on its validation or test rows: per task, pooled over all rows, and the mean over tasks.

Each task is scored with its own stored parameters v_t on its rows of the split. The metrics are the config's
``eval.metrics`` (default per task type, :data:`metaprox.metrics.DEFAULT_METRICS`): RMSE, MAE, R², explained
variance (regression); accuracy, log-loss, AUC (classification; AUC for binary tasks). ``pooled`` scores all
rows of the split at once; ``task_mean`` averages the per-task values (NaN-free tasks only, counted in
``tasks_scored``). Under torchrun each rank predicts the tasks it owns and one all-reduce gathers them.

``metaprox eval RUN --split val|test`` (:func:`evaluate_finite_run`) writes ``eval-val.json`` / ``eval.json``,
the markdown table ``eval-val.md`` / ``eval.md`` and the per-task table ``tasks-val.csv`` / ``tasks-test.csv``.
A set of task kinds (``[[task.kinds]]``, :mod:`metaprox.finite_kinds`) is scored per kind (:func:`kinds_result`:
one table per kind; the per-task table gains a ``kind`` column).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaprox import sharded
from metaprox.build import build_finite, finite_model
from metaprox.checkpoint import atomic_write
from metaprox.config import ConfigError
from metaprox.distributed import LocalReducer
from metaprox.finite_data import FiniteData, load_finite_data
from metaprox.finite_kinds import FiniteKinds, load_kinds, open_kinds_learner
from metaprox.memory import keeper_of
from metaprox.metrics import metric_functions
from metaprox.rundir import read_config

__all__ = ["evaluate_split", "check_auc_classes", "finite_result", "write_eval", "evaluate_finite_run", "markdown",
           "headline", "kinds_result"]


def check_auc_classes(fd: FiniteData, metrics: list[str] | None, splits: tuple[str, ...] = ("val", "test")) -> None:
    """AUC needs both classes among a task's rows of every scored split: else an error naming task and split."""
    if fd.task_type != "binary" or "auc" not in metric_functions(fd.task_type, metrics):
        return
    for split in splits:
        if not fd.has(split):
            continue
        rows = fd.rows(split)
        for t, name in enumerate(fd.names):
            classes = np.unique(fd.data.y[rows & (fd.data.task == t)])
            if len(classes) < 2:
                raise ConfigError(f"{fd.source}: task {name!r} has only class {classes.tolist()} among its {split} "
                                  f"rows, so its AUC is undefined. Drop 'auc' from eval.metrics, drop the task, or "
                                  f"change the split (task.split_seed, task.test_frac / task.val_frac).")


def _predictions(learner: Any, fd: FiniteData, split: str) -> list[np.ndarray]:
    """Every task's outputs on its rows of ``split`` (each rank fills its own tasks; one sum gathers them)."""
    tasks = fd.tasks(split)
    sizes = [len(t.x) for t in tasks]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    buf = torch.zeros(int(offsets[-1]), fd.outputs, dtype=torch.float64)
    lo, hi = learner.owned_range()
    for i in range(lo, hi):
        buf[offsets[i]:offsets[i + 1]] = learner.predict_task(i, tasks[i].x).double().view(sizes[i], -1)
    (buf,), _ = learner.reducer.sum([buf], {})
    return [buf[offsets[i]:offsets[i + 1]].numpy() for i in range(len(tasks))]


def _targets(fd: FiniteData, split: str) -> list[np.ndarray]:
    out = []
    for t in fd.tasks(split):
        y = t.y.numpy()
        out.append(y if fd.classify else y.reshape(len(y), -1))
    return out


def evaluate_split(learner: Any, fd: FiniteData, split: str, metrics: list[str] | None = None) -> dict[str, Any]:
    """``{"split", "rows", "pooled": {metric: v}, "task_mean": {metric: v}, "tasks_scored": {metric: k},
    "per_task": [{"task", "rows", "train_rows", metric: v, ...}]}`` of the learner's per-task parameters."""
    fns = metric_functions(fd.task_type, metrics)
    check_auc_classes(fd, list(fns), (split,))
    preds, ys = _predictions(learner, fd, split), _targets(fd, split)
    train_rows = np.bincount(fd.data.task[fd.rows("train")], minlength=len(fd.names))
    per_task = []
    for t, (p, y) in enumerate(zip(preds, ys, strict=True)):
        row: dict[str, Any] = {"task": fd.names[t], "rows": len(y), "train_rows": int(train_rows[t])}
        row.update({m: f(p, y) for m, f in fns.items()})
        per_task.append(row)
    pooled = {m: f(np.concatenate(preds), np.concatenate(ys)) for m, f in fns.items()}
    task_mean, scored = {}, {}
    for m in fns:
        vals = [r[m] for r in per_task if not math.isnan(r[m])]
        task_mean[m] = float(np.mean(vals)) if vals else float("nan")
        scored[m] = len(vals)
    return {"split": split, "rows": int(sum(len(y) for y in ys)), "pooled": pooled, "task_mean": task_mean,
            "tasks_scored": scored, "per_task": per_task}


LABELS = {"rmse": "RMSE", "mae": "MAE", "r2": "R²", "explained_variance": "explained variance",
          "accuracy": "accuracy", "log_loss": "log-loss", "auc": "AUC"}


def _table(title: str, pooled: dict[str, float], task_mean: dict[str, float]) -> list[str]:
    names = list(pooled)
    lines = [f"| {title} | " + " | ".join(LABELS[m] for m in names) + " |", "|---|" + "---|" * len(names)]
    for label, values in (("pooled", pooled), ("task mean", task_mean)):
        lines.append(f"| {label} | " + " | ".join(f"{values[m]:.4f}" for m in names) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The pooled and task-mean metrics as one markdown table (a set of kinds: one table per kind)."""
    ev, step = result["eval"], result["step"]
    if "kinds" in ev:
        lines = []
        for k, size in ev["kinds"].items():
            title = f"{k}: {ev['split']} ({size['rows']} rows, {size['tasks']} tasks, step {step})"
            lines += [*_table(title, ev["pooled"][k], ev["task_mean"][k]), ""]
        lines.pop()
    else:
        lines = _table(f"{ev['split']} ({ev['rows']} rows, {result['tasks']} tasks, step {step})", ev["pooled"],
                       ev["task_mean"])
    if result["J"] is not None:  # a rule's TaskMemory (finite.rule other than "mmp") has no joint objective
        lines.append(f"\njoint objective J = {result['J']:.6g}\n")
    return "\n".join(lines)


def per_task_csv(result: dict[str, Any]) -> str:
    rows = result["eval"]["per_task"]
    out = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))  # kinds may differ in metrics (binary: AUC)
    writer = csv.DictWriter(out, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return out.getvalue()


def headline(ev: dict[str, Any]) -> dict[str, Any]:
    """The headline number of an :func:`evaluate_split` record: RMSE pooled over all rows; AUC averaged over
    tasks; else the first metric, pooled."""
    first = next(iter(ev["pooled"]))
    metric = "rmse" if "rmse" in ev["pooled"] else "auc" if "auc" in ev["pooled"] else first
    kind = "task_mean" if metric == "auc" else "pooled"
    return {"metric": metric, "value": ev[kind][metric], "rows": ev["rows"],
            "tasks_scored": ev["tasks_scored"][metric]}


def finite_result(cfg: dict[str, Any], learner: Any, fd: FiniteData, split: str) -> dict[str, Any]:
    """The evaluation record of ``split``: :func:`evaluate_split` under ``"eval"``, and under the split's name
    the :func:`headline` number, with the joint objective ``J`` where the learner has one (FiniteMMP; a rule's
    TaskMemory: None). A collective under torchrun."""
    ev = evaluate_split(keeper_of(learner), fd, split, cfg["eval"]["metrics"])
    objective = learner.objective() if hasattr(learner, "objective") else None
    return {"step": learner.step_count, "dataset": fd.source, "tasks": len(fd.names), "J": objective,
            split: headline(ev), "eval": ev}


class _KindTasks:
    """The tasks of one kind of a :class:`~metaprox.algorithms.multihead.FiniteMultiHeadMMP`, numbered from 0,
    as :func:`evaluate_split` reads a finite learner."""

    def __init__(self, learner: Any, offset: int, count: int):
        self.learner, self.offset, self.count = learner, offset, count
        self.reducer = learner.reducer

    def owned_range(self) -> tuple[int, int]:
        return 0, self.count

    def predict_task(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.learner.predict_task(self.offset + i, x)


def kinds_result(cfg: dict[str, Any], learner: Any, kinds: FiniteKinds, split: str) -> dict[str, Any]:
    """The evaluation record of a finite set of kinds: per kind (metrics pooled over kinds with different
    targets would mean nothing) ``pooled``, ``task_mean`` and ``tasks_scored`` keyed by kind, their rows and
    tasks under ``kinds``, one ``per_task`` list with each task's kind, and under the split's name each kind's
    :func:`headline`; J is the joint objective over all kinds."""
    evs = {}
    for name, part, lo, hi in zip(kinds.names, kinds.parts, kinds.offsets[:-1], kinds.offsets[1:], strict=True):
        evs[name] = evaluate_split(_KindTasks(learner, lo, hi - lo), part, split, cfg["eval"]["metrics"])
    ev = {"split": split, "rows": sum(e["rows"] for e in evs.values()),
          "kinds": {k: {"rows": e["rows"], "tasks": len(e["per_task"])} for k, e in evs.items()},
          **{part: {k: e[part] for k, e in evs.items()} for part in ("pooled", "task_mean", "tasks_scored")},
          "per_task": [{"kind": k, **row} for k, e in evs.items() for row in e["per_task"]]}
    return {"step": learner.step_count, "dataset": kinds.source, "tasks": kinds.offsets[-1],
            "J": learner.objective(), split: {k: headline(e) for k, e in evs.items()}, "eval": ev}


def write_eval(run_dir: Path, result: dict[str, Any]) -> None:
    """``eval.json``/``eval.md``/``tasks-test.csv`` (test) or ``eval-val.*``/``tasks-val.csv`` (validation)."""
    split = result["eval"]["split"]
    stem = "eval" if split == "test" else f"eval-{split}"
    atomic_write(run_dir / f"{stem}.json", json.dumps(result, indent=1).encode())
    atomic_write(run_dir / f"{stem}.md", markdown(result).encode())
    atomic_write(run_dir / f"tasks-{split}.csv", per_task_csv(result).encode())


def evaluate_finite_run(run_dir: str | Path, split: str = "test", metrics: list[str] | None = None,
                        write: bool = True) -> dict[str, Any]:
    """Score a finite run's last checkpoint on ``split`` (one process; see the module doc for the files)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if metrics is not None:
        cfg = {**cfg, "eval": {**cfg["eval"], "metrics": metrics}}
    reducer = LocalReducer()
    if cfg["task"]["kinds"]:  # a set of kinds (metaprox.finite_kinds): one store per kind
        kinds = load_kinds(cfg)
        learner = open_kinds_learner(cfg, kinds, run_dir, reducer, resume=True)
        sharded.load(run_dir, learner)
        result = kinds_result(cfg, learner, kinds, split)
    else:
        fd = load_finite_data(cfg)
        train = fd.tasks("train")
        layout = sharded.layout_of(finite_model(cfg, train[0].x.shape[1], fd.outputs))
        store = sharded.open_shard(run_dir, layout, len(train), reducer, resume=True)
        learner = build_finite(cfg, train, fd, store)
        learner.reducer = reducer
        sharded.load(run_dir, learner)
        result = finite_result(cfg, learner, fd, split)
    if write:
        write_eval(run_dir, result)
    return result
