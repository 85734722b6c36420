"""``metaprox train`` for a *finite* task set (``algorithm = "finite_mmp"``): persistent per-task parameters.

The tasks are the ones of a tabular multi-task set (``task.family = "multitask"``): a table of one's own
(``task.file``) or a named preset (landmine, computer_survey, parkinsons from ``task.data_path``), each task's
rows split into training, validation and test rows (:mod:`metaprox.finite_data`).
:class:`~metaprox.algorithms.finite.FiniteMMP` keeps every task's v_t in a memory-mapped store, warm-starts it,
and moves the center w. The same command runs in one process or under ``torchrun``: the tasks are partitioned
in contiguous blocks over the ranks, each rank owns the store shard of its block and solves only its tasks of
every (global, identical) minibatch; one all-reduce per outer step.

Run directory: ``config.json``, ``metrics.jsonl`` (step, joint objective J, meta-gradient norm, inner
stationarity, and the gap J − J* where the joint optimum has a closed form), ``checkpoint.json`` + tensors (the
meta state) with ``store-rank{r}-of-{W}/`` (per-rank shards, committed together by two-phase commit,
:mod:`metaprox.sharded`), ``eval*.json`` / ``eval*.md`` / ``tasks-*.csv``. ``--resume`` continues from the last
checkpoint, also with another world size (the shards are re-partitioned).

Evaluation (:mod:`metaprox.finite_eval`): each task's own v_t on its rows of a split, per task, pooled and
averaged over tasks, with the metrics of ``eval.metrics``. At the end of training on the validation rows if
there are any (``task.val_frac > 0`` or a split column), else on the test rows;
``metaprox eval RUN --split val|test`` scores either later. Test rows are never used for training or selection.

Divergence (:mod:`metaprox.stability`): an outer step with ηλ ≥ 2 is refused up front (unless
``outer.allow_unstable``), and a run whose J or meta-gradient norm grows by ``finite.divergence_growth`` stops
with :class:`~metaprox.train.TrainingDiverged` naming the step (logged or not).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaprox import sharded
from metaprox.algorithms import ALGORITHMS
from metaprox.algorithms.base import NonFiniteError
from metaprox.algorithms.finite import FiniteMMP
from metaprox.build import build_inner, build_prior, optimizer_factory, rule_options
from metaprox.checkpoint import CheckpointError
from metaprox.config import ConfigError
from metaprox.distributed import AllReduceReducer, Reducer
from metaprox.finite_data import FiniteData, load_finite_data
from metaprox.finite_eval import check_auc_classes, evaluate_split, write_eval
from metaprox.memory import TaskMemory
from metaprox.rundir import read_config, read_metrics, write_config, write_metrics
from metaprox.stability import DivergenceGuard, check_outer_step
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSampler, TaskSet

__all__ = ["train_finite", "build_finite", "finite_result", "finite_model"]

DT = torch.float64
GAP_BUDGET = 50_000_000  # float64 entries (400 MB) of the per-task systems H_t for logging the gap J − J*


def finite_model(cfg: dict[str, Any], features: int, outputs: int) -> nn.Module:
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


def build_finite(cfg: dict[str, Any], train: list[Task], fd: FiniteData, store: Any = None) -> Any:
    """The config's learner on the training tasks (``store``: the run's shard; None: in memory): FiniteMMP
    (``finite.rule = "mmp"``), or the rule's learner with a :class:`~metaprox.memory.TaskMemory`."""
    f, o = cfg["finite"], cfg["outer"]
    if cfg["precision"] != "fp32":
        raise ConfigError(f"precision = {cfg['precision']!r}: finite_mmp has no reduced-precision path (its "
                          f"linear and MLP models compute in float64); remove the precision setting.")
    n = len(train)
    batch = None if f["sample"] == "all" else o["meta_batch"]
    sampler = TaskSampler(n, batch, replacement=f["sample"] == "with_replacement", seed=cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = finite_model(cfg, train[0].x.shape[1], fd.outputs)
    tasks = TaskSet(train)
    if f["rule"] != "mmp":
        lam = cfg["prox"]["lam"]
        learner = ALGORITHMS[f["rule"]](
            model, "cross_entropy" if fd.classify else "mse", lam=None if lam == 0 else _lam(cfg),
            inner=build_inner(cfg), meta_optimizer=optimizer_factory(cfg), outer_lr=o["lr"], total_steps=o["steps"],
            schedule=o["schedule"], execution=cfg["execution"], seed=cfg["seed"], **rule_options(cfg, f["rule"]))
        try:
            TaskMemory(learner, tasks, store=store, sampler=sampler, task_lam=f["task_lam"])
        except ValueError as e:
            raise ConfigError(f"finite.rule = {f['rule']!r}: {e}") from e
        return learner
    center = "fixed" if f["center_update"] == "solve" else f["center_update"]  # solve: set once, then kept
    return FiniteMMP(model, tasks, "cross_entropy" if fd.classify else "mse", lam=_lam(cfg),
                     **build_prior(cfg, len(tasks), tasks.weights), task_lam=f["task_lam"], inner=build_inner(cfg),
                     store=store, center_update=center,
                     sampler=sampler, meta_optimizer=optimizer_factory(cfg), outer_lr=o["lr"], total_steps=o["steps"],
                     schedule=o["schedule"], execution=cfg["execution"], seed=cfg["seed"])


def keeper_of(learner: Any) -> Any:
    """What holds the per-task parameters: a FiniteMMP itself, or a rule's :class:`~metaprox.memory.TaskMemory`."""
    return learner if learner.memory is None else learner.memory


def _objective(learner: Any) -> float | None:
    """The joint objective J where the learner has one (MMP's finite objective; other rules: None)."""
    return learner.objective() if hasattr(learner, "objective") else None


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
    bad = first_nonfinite(zip(learner.names, learner.fmodel.params(), strict=True))
    if bad is not None:
        raise TrainingDiverged(diverged_message(s, f"center parameter {bad} is not finite after outer step "
                                                   f"{s + 1} (outer.lr too large?)", run_dir))
    return diag


def _closed_form(cfg: dict[str, Any], learner: Any, start: bool) -> float | None:
    """J* where the joint optimum has a closed form (linear least squares, :mod:`metaprox.joint_ridge`), else
    None (also when the n per-task systems would exceed :data:`GAP_BUDGET` entries: no gap is logged then).
    ``finite.center_update = "solve"``: the optimum is written into the learner at the start (every rank solves
    the whole small system and writes the rows it owns); the solved center is then kept fixed."""
    from metaprox import joint_ridge

    if not isinstance(learner, FiniteMMP):
        return None  # a rule's TaskMemory: no joint objective (finite.rule = "mmp" only; config refuses "solve")
    why = joint_ridge.applies_to(learner)
    if cfg["finite"]["center_update"] == "solve":
        if why is not None:
            raise ConfigError(f"finite.center_update = 'solve' needs the closed-form joint optimum of linear "
                              f"least-squares tasks, but {why}: use 'exact' or 'gradient'.")
        if start:
            return joint_ridge.apply_to(learner, learner.owned_range()).objective
    big = len(learner.tasks) * learner.layout.numel ** 2 > GAP_BUDGET  # the per-task systems would not fit
    return None if why is not None or big else joint_ridge.solve_learner(learner).objective


def finite_result(cfg: dict[str, Any], learner: Any, fd: FiniteData, split: str) -> dict[str, Any]:
    """The evaluation record of ``split``: :func:`~metaprox.finite_eval.evaluate_split` under ``"eval"``, and
    under the split's name the headline number (RMSE pooled over all rows; AUC averaged over tasks; else the
    first metric, pooled)."""
    ev = evaluate_split(keeper_of(learner), fd, split, cfg["eval"]["metrics"])
    first = next(iter(ev["pooled"]))
    headline = "rmse" if "rmse" in ev["pooled"] else "auc" if "auc" in ev["pooled"] else first
    kind = "task_mean" if headline == "auc" else "pooled"
    head = {"metric": headline, "value": ev[kind][headline], "rows": ev["rows"],
            "tasks_scored": ev["tasks_scored"][headline]}
    return {"step": learner.step_count, "dataset": fd.source, "tasks": len(fd.names), "J": _objective(learner),
            split: head, "eval": ev}


def train_finite(cfg: dict[str, Any], run_dir: Path, resume: bool | str, progress: bool | None, evaluate: bool,
                 stop_at: int | None, reducer: Reducer) -> dict[str, Any]:
    from tqdm import tqdm

    from metaprox.train import TrainingDiverged, config_diff

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
        changed = [d for d in config_diff(read_config(run_dir), cfg) if not d.startswith(("log.", "eval.", "threads:"))]
        if changed:
            raise ConfigError("cannot resume with a different config; changed: " + "; ".join(changed))
    fd = load_finite_data(cfg)
    check_auc_classes(fd, cfg["eval"]["metrics"])
    train = fd.tasks("train")
    layout = sharded.layout_of(finite_model(cfg, train[0].x.shape[1], fd.outputs))
    store = sharded.open_shard(run_dir, layout, len(train), reducer, resume=bool(resume))
    learner = build_finite(cfg, train, fd, store)
    learner.reducer = reducer
    if isinstance(learner, FiniteMMP):  # MMP's envelope step: ηλ ≥ 2 overshoots (metaprox.stability)
        check_outer_step(cfg, float(learner.task_scale.double().mean()))  # per-task pulls λ_t = s_t·λ
    guard = DivergenceGuard(cfg["finite"]["divergence_growth"])
    drives = cfg["finite"]["center_update"] == "gradient"  # else the meta-gradient may sit at round-off level
    rows: list[dict[str, Any]] = []
    if resume:
        sharded.load(run_dir, learner)
        rows = [r for r in read_metrics(run_dir) if r["step"] <= learner.step_count]
        if rows:  # the guard's reference values: the first logged ones
            guard.check(int(rows[0]["step"]), J=rows[0].get("J"),
                        meta_grad_norm=rows[0].get("meta_grad_norm") if drives else None)
    if isinstance(reducer, AllReduceReducer):
        reducer.check_same(learner.step_count, "the step to start from")
    j_star = _closed_form(cfg, learner, start=not resume)
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
            try:
                diag = _guarded_step(learner, monitor, run_dir)
            except TrainingDiverged:  # on every rank alike (the center gradient is all-reduced)
                if main:
                    write_metrics(run_dir, rows)
                raise
            row = None
            if monitor:
                row = {**diag, "step": learner.step_count, "J": _objective(learner), "time": time.perf_counter() - t0}
                if j_star is not None:
                    row.update(J_star=j_star, gap=row["J"] - j_star)
                rows.append(row)
            try:
                guard.check(learner.step_count, J=row["J"] if row else None,  # the gradient moves w only if "gradient"
                            meta_grad_norm=diag["meta_grad_norm"] if drives else None)
            except TrainingDiverged:
                if main:
                    write_metrics(run_dir, rows)
                raise
            if learner.step_count % log["checkpoint_every"] == 0 or learner.step_count == end:
                checkpoint()
            bar.update(1)
    finally:
        bar.close()
    if not evaluate or learner.step_count < total:
        return {}
    result = finite_result(cfg, learner, fd, "val" if fd.has("val") else "test")
    if main:
        write_eval(run_dir, result)
    return result if main else {}
