"""``metaprox train`` for a *finite* task set (``algorithm = "finite_mmp"``): persistent per-task parameters.

The tasks are the ones of a tabular multi-task set (``task.family = "multitask"``: landmine, computer_survey or
parkinsons from ``task.data_path``), each split into training rows (the task's data term) and test rows.
:class:`~metaprox.algorithms.finite.FiniteMMP` keeps every task's v_t in a memory-mapped store, warm-starts it,
and moves the center w. The same command runs in one process or under ``torchrun``: the tasks are partitioned
in contiguous blocks over the ranks, each rank owns the store shard of its block and solves only its tasks of
every (global, identical) minibatch; one all-reduce per outer step.

Run directory: ``config.json``, ``metrics.jsonl`` (step, joint objective J, meta-gradient norm, inner
stationarity), ``checkpoint.json`` + tensors (the meta state) with ``store-rank{r}-of-{W}/`` (per-rank shards,
committed together by two-phase commit, :mod:`metaprox.sharded`), ``eval.json`` / ``eval.md``. ``--resume``
continues from the last checkpoint, also with another world size (the shards are re-partitioned).

Evaluation: each task's own v_t on its test rows — RMSE over all test rows (regression), or the mean per-task
AUC (landmine, classification).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metaprox import sharded
from metaprox.algorithms import ALGORITHMS
from metaprox.algorithms.base import NonFiniteError
from metaprox.algorithms.finite import FiniteMMP
from metaprox.build import _optimizer_factory, build_inner, build_prior, rule_options
from metaprox.checkpoint import CheckpointError, atomic_write
from metaprox.config import ConfigError
from metaprox.distributed import AllReduceReducer, Reducer
from metaprox.memory import TaskMemory
from metaprox.metrics import auc
from metaprox.rundir import read_config, read_metrics, write_config, write_metrics
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSampler, TaskSet

__all__ = ["train_finite", "finite_tasks", "evaluate_finite"]

DATASETS = ("landmine", "computer_survey", "parkinsons")
CLASSIFY = {"landmine"}
DT = torch.float64


def finite_tasks(cfg: dict[str, Any]) -> tuple[list[Task], list[Task], bool]:
    """(training tasks, test tasks, classification?) of a ``task.family = "multitask"`` config.

    Rows: computer_survey — its fixed protocol (profiles 1–16 train, 17–20 test); the others — a random
    ``task.train_frac`` of each task's rows (``task.split_seed``). Features standardised with training rows.
    """
    from metaprox.data import multitask

    t = cfg["task"]
    name = t["dataset"]
    if name not in DATASETS:
        raise ConfigError(f"task.dataset = {name!r} for family 'multitask': choose one of {DATASETS}.")
    loader = {"landmine": multitask.load_landmine, "computer_survey": multitask.load_computer_survey,
              "parkinsons": multitask.load_parkinsons}[name]
    data = loader(t["data_path"])
    if name == "computer_survey":
        train = data.extra["profile"] <= 16
    else:
        if not 0.0 < t["train_frac"] < 1.0:
            raise ConfigError(f"task.train_frac = {t['train_frac']} must be in (0, 1).")
        rng = np.random.default_rng(t["split_seed"])
        train = multitask.split_per_task(data.task, t["train_frac"], rng)
    classify = name in CLASSIFY
    mean, std = data.x[train].mean(0), data.x[train].std(0) + 1e-12
    y_dtype = torch.int64 if classify else DT
    return (data.tasks(train, y_dtype, mean, std), data.tasks(~train, y_dtype, mean, std), classify)


def _model(cfg: dict[str, Any], features: int, outputs: int) -> nn.Module:
    kind = cfg["model"]["kind"]
    if kind == "linear":
        model = nn.Linear(features, outputs)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model.to(DT)
    if kind == "mlp":
        sizes = [features, *cfg["model"]["sizes"][1:-1], outputs]
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[cfg["model"]["activation"]]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1])] + ([act()] if i < len(sizes) - 2 else [])
        torch.manual_seed(cfg["seed"])
        return nn.Sequential(*layers).to(DT)
    raise ConfigError(f"model.kind = {kind!r} for a multitask run: use 'linear' or 'mlp'.")


def _lam(cfg: dict[str, Any]) -> Any:
    lam = cfg["prox"]["lam"]
    return dict(lam) if isinstance(lam, dict) else float(lam)


def build_finite(cfg: dict[str, Any], train: list[Task], classify: bool, store: Any = None) -> Any:
    """FiniteMMP (``finite.rule = "mmp"``), or the rule's learner with a :class:`~metaprox.memory.TaskMemory`."""
    f, o = cfg["finite"], cfg["outer"]
    if cfg["precision"] != "fp32":
        raise ConfigError(f"precision = {cfg['precision']!r}: finite_mmp has no reduced-precision path (its "
                          f"linear and MLP models compute in float64); remove the precision setting.")
    n = len(train)
    batch = None if f["sample"] == "all" else o["meta_batch"]
    sampler = TaskSampler(n, batch, replacement=f["sample"] == "with_replacement", seed=cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = _model(cfg, train[0].x.shape[1], 2 if classify else 1)
    tasks = TaskSet(train)
    if f["rule"] != "mmp":
        lam = cfg["prox"]["lam"]
        learner = ALGORITHMS[f["rule"]](
            model, "cross_entropy" if classify else "mse", lam=None if lam == 0 else _lam(cfg), inner=build_inner(cfg),
            meta_optimizer=_optimizer_factory(cfg), outer_lr=o["lr"], total_steps=o["steps"], schedule=o["schedule"],
            execution=cfg["execution"], seed=cfg["seed"], **rule_options(cfg, f["rule"]))
        try:
            TaskMemory(learner, tasks, store=store, sampler=sampler, task_lam=f["task_lam"])
        except ValueError as e:
            raise ConfigError(f"finite.rule = {f['rule']!r}: {e}") from e
        return learner
    return FiniteMMP(model, tasks, "cross_entropy" if classify else "mse", lam=_lam(cfg),
                     **build_prior(cfg, len(tasks), tasks.weights),
                     task_lam=f["task_lam"], inner=build_inner(cfg), store=store, center_update=f["center_update"],
                     sampler=sampler, meta_optimizer=_optimizer_factory(cfg), outer_lr=o["lr"], total_steps=o["steps"],
                     schedule=o["schedule"], execution=cfg["execution"], seed=cfg["seed"])


def evaluate_finite(learner: Any, test: list[Task], classify: bool) -> dict[str, Any]:
    """Each task's v_t on its test rows, summed over the ranks (each rank scores the tasks it owns)."""
    keeper = learner if learner.memory is None else learner.memory  # FiniteMMP, or a rule's TaskMemory
    lo, hi = keeper.owned_range()
    sq, rows, auc_sum, auc_n = 0.0, 0.0, 0.0, 0.0
    for i in range(lo, hi):
        out = keeper.predict_task(i, test[i].x)
        if classify:
            a = auc((out[:, 1] - out[:, 0]).numpy(), test[i].y.numpy())
            if a == a:  # NaN when a task's test rows hold one class only
                auc_sum, auc_n = auc_sum + a, auc_n + 1
        else:
            sq += float((out - test[i].y).square().sum())
            rows += test[i].y.numel()
    tot = learner.reducer.sum([], {"sq": sq, "rows": rows, "auc": auc_sum, "auc_n": auc_n})[1]
    if classify:
        return {"metric": "auc", "value": tot["auc"] / max(tot["auc_n"], 1.0), "tasks_scored": int(tot["auc_n"])}
    return {"metric": "rmse", "value": (tot["sq"] / max(tot["rows"], 1.0)) ** 0.5, "rows": int(tot["rows"])}


def _guarded_step(learner: Any, monitor: bool, run_dir: Path) -> dict[str, float]:
    """``learner.step``, stopped with :class:`~metaprox.train.TrainingDiverged` at a NaN/inf (the same on every
    rank: the center is all-reduced), before any checkpoint can hold it."""
    from metaprox.nonfinite import diverged_message, first_nonfinite
    from metaprox.train import TrainingDiverged

    s = learner.step_count
    try:
        diag = learner.step(monitor=monitor)
    except NonFiniteError as e:
        raise TrainingDiverged(diverged_message(s, str(e).rstrip("."), run_dir)) from e
    bad = first_nonfinite(zip(learner.names, learner.fmodel.params()))
    if bad is not None:
        raise TrainingDiverged(diverged_message(s, f"center parameter {bad} is not finite after outer step "
                                                   f"{s + 1} (outer.lr too large?)", run_dir))
    return diag


def _objective(learner: Any) -> dict[str, float]:
    """``{"J": the joint objective}`` where the learner has one (MMP's finite objective; other rules: none)."""
    return {"J": learner.objective()} if hasattr(learner, "objective") else {}


def train_finite(cfg: dict[str, Any], run_dir: Path, resume: bool | str, progress: bool | None, evaluate: bool,
                 stop_at: int | None, reducer: Reducer) -> dict[str, Any]:
    from tqdm import tqdm

    from metaprox.train import _diff

    main = reducer.rank == 0
    has_ckpt = (run_dir / "checkpoint.json").is_file()
    if resume == "auto":
        resume = has_ckpt
    if has_ckpt and not resume:
        raise ConfigError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it or choose "
                          f"another --out.")
    if resume and not has_ckpt:
        raise CheckpointError(f"--resume: no checkpoint in {str(run_dir)!r} yet; start without --resume.")
    if resume:
        changed = [d for d in _diff(read_config(run_dir), cfg) if not d.startswith(("log.", "eval."))]
        if changed:
            raise ConfigError("cannot resume with a different config; changed: " + "; ".join(changed))
    train, test, classify = finite_tasks(cfg)
    layout = sharded.layout_of(_model(cfg, train[0].x.shape[1], 2 if classify else 1))
    store = sharded.open_shard(run_dir, layout, len(train), reducer, resume=bool(resume))
    learner = build_finite(cfg, train, classify, store)
    learner.reducer = reducer
    rows: list[dict[str, Any]] = []
    if resume:
        sharded.load(run_dir, learner)
        rows = [r for r in read_metrics(run_dir) if r["step"] <= learner.step_count]
    if isinstance(reducer, AllReduceReducer):
        reducer.check_same(learner.step_count, "the step to start from")
    if main:
        write_config(run_dir, cfg)
    total, log = cfg["outer"]["steps"], cfg["log"]
    end = total if stop_at is None else min(total, stop_at)
    show = (log["progress"] if progress is None else progress) and main
    t0 = time.perf_counter()

    def checkpoint() -> None:
        # the metrics log first: a resume keeps its rows up to the checkpoint's step, so rows written ahead of a
        # checkpoint that never commits are dropped, while rows written after the commit would be lost by a
        # death in between
        if main:
            write_metrics(run_dir, rows)
        sharded.save(run_dir, learner)  # a collective: every rank commits its shard

    bar = tqdm(total=total, initial=learner.step_count, disable=not show, desc=cfg["name"], unit="it")
    try:
        while learner.step_count < end:
            monitor = (learner.step_count + 1) % log["every"] == 0 or learner.step_count + 1 == total
            diag = _guarded_step(learner, monitor, run_dir)
            if monitor:
                rows.append({**diag, "step": learner.step_count, **_objective(learner),
                             "time": time.perf_counter() - t0})
            if learner.step_count % log["checkpoint_every"] == 0 or learner.step_count == end:
                checkpoint()
            bar.update(1)
    finally:
        bar.close()
    if not evaluate or learner.step_count < total:
        return {}
    result = {"step": learner.step_count, "dataset": cfg["task"]["dataset"], "tasks": len(train),
              "J": _objective(learner).get("J"), "test": evaluate_finite(learner, test, classify)}
    if main:
        atomic_write(run_dir / "eval.json", json.dumps(result, indent=1).encode())
        t = result["test"]
        atomic_write(run_dir / "eval.md", (
            f"| dataset | tasks | step | joint objective J | test {t['metric'].upper()} |\n|---|---|---|---|---|\n"
            f"| {result['dataset']} | {result['tasks']} | {result['step']} | "
            f"{'–' if result['J'] is None else format(result['J'], '.6g')} | "
            f"{t['value']:.4f} |\n").encode())
    return result if main else {}
