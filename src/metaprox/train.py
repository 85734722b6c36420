"""The training loop of a run: config → tasks → outer steps → metrics, checkpoints, validation, evaluation.

``train(cfg, out_dir)`` starts a run; ``train(cfg, out_dir, resume=True)`` continues it from its last
checkpoint, bitwise identical (on CPU) to an uninterrupted run: the task-sampling and inner-minibatch
generators, optimizer state, step counter (and a finite set's per-task rows) are all checkpointed.

There is one loop (:func:`train`) for every run. What differs between a task *stream* and a *finite* task set
comes from a setting object — :class:`StreamSetting` (every algorithm but ``finite_mmp``) or
:class:`FiniteSetting` (``algorithm = "finite_mmp"``, a tabular multi-task set): it builds the learner, says
which tasks a step gets, what else a metrics row holds, which growth guard applies, how a checkpoint is saved and
loaded, what validation and the final evaluation are. Written once, for both: the resume rules (``--resume``,
``--auto-resume``, an unchanged config), the run lock, the NaN/inf guard (:class:`TrainingDiverged`, exit 3),
the metrics log and TensorBoard, periodic validation (``val_curve.jsonl``), checkpoints every
``log.checkpoint_every`` steps (the logs first), ``stop_at`` / ``max_seconds`` and ``outer.minutes``.

Task stream: each step draws a fresh minibatch from the config's task family. Under ``torchrun
--nproc-per-node N`` (``WORLD_SIZE > 1``) all ranks draw the same minibatch (each builds only its share of it:
``family.train_share``), each solves its share, one all-reduce combines them (:mod:`metaprox.distributed`).
With ``pretrain.epochs > 0`` a new run first pretrains the backbone (:mod:`metaprox.pretrain`); the training
clock then includes the pretraining seconds. The final evaluation is :func:`metaprox.evaluate.evaluate_run`
(``eval.json``, plots).

Finite set: the tasks of a tabular multi-task set (``task.file``, or the landmine / computer_survey /
parkinsons presets), each task's rows split into training, validation and test rows (:mod:`metaprox.finite_data`).
The learner (:func:`metaprox.build.build_finite`) keeps every task's v_t in a memory-mapped store, warm-starts
it, and moves the center; under torchrun the tasks are partitioned in contiguous blocks over the ranks, each rank
owns the store shard of its block (``store-rank{r}-of-{W}/``, committed with the meta state by two-phase commit,
:mod:`metaprox.sharded`; ``--resume`` also works with another world size). Metrics rows add the joint objective
J and, where the joint optimum has a closed form (:mod:`metaprox.joint_ridge`), J* and the gap J − J*. An outer
step with ηλ ≥ 2 is refused up front (unless ``outer.allow_unstable``), and J or the meta-gradient norm growing
by ``finite.divergence_growth`` stops the run (:mod:`metaprox.stability`). Validation and the final evaluation
score each task's own v_t on its validation (else test) rows (:mod:`metaprox.finite_eval`: ``eval*.json``,
``eval*.md``, ``tasks-*.csv``); test rows are never used for training or selection. Tasks of several kinds
(``[[task.kinds]]``: one table or preset per kind, each with its own encoder and head around a shared trunk,
:mod:`metaprox.finite_kinds`) run the same way in one process, with one store per kind and metrics per kind.

``resume="auto"`` (``--auto-resume``) resumes when there is a checkpoint and starts otherwise — what workers
restarted by ``torchrun --max-restarts`` need (docs/distributed.md). Only rank 0 writes files (a finite set's
shards: each rank its own).

With ``log.eval_every = N > 0`` the run also validates every N iterations (and at iteration 0) and writes
``val_curve.jsonl``; the time this takes is excluded from the training clock (``time`` in metrics and val_curve
rows), and training itself is unchanged by it (same RNG streams). ``outer.minutes > 0`` ends meta-training after
that many minutes (not counting pretraining or validation) and evaluates the run as if it had reached
``outer.steps``; a linear outer schedule then decays over the budget (its horizon re-estimated every step from the
measured speed, capped at ``outer.steps``), so such a run depends on the machine's speed and is not bitwise
reproducible. Under torchrun the ranks agree on the clock (its mean over the ranks), so they stop together.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from metaprox import joint_ridge, sharded
from metaprox.algorithms.base import MetaLearner, NonFiniteError
from metaprox.algorithms.finite import FiniteMMP
from metaprox.algorithms.multihead import FiniteMultiHeadMMP
from metaprox.build import build_family, build_finite, build_learner, finite_model
from metaprox.checkpoint import CheckpointError, decode_rng, encode_rng, load_checkpoint, save_checkpoint
from metaprox.config import ConfigError
from metaprox.distributed import AllReduceReducer, Reducer, is_restart, process_group
from metaprox.evaluate import PeriodicValidation, evaluate_run
from metaprox.finite_data import FiniteData, load_finite_data
from metaprox.finite_eval import check_auc_classes, finite_result, kinds_result, write_eval
from metaprox.finite_kinds import FiniteKinds, load_kinds, open_kinds_learner
from metaprox.memory import keeper_of
from metaprox.nonfinite import TrainingDiverged, diverged_message, first_nonfinite, nonfinite_evaluation
from metaprox.pretrain import pretrain_backbone, start_from_backbone
from metaprox.rundir import read_config, read_metrics, write_config, write_metrics
from metaprox.runlock import run_lock
from metaprox.stability import DivergenceGuard, check_outer_step
from metaprox.validate import validate_run

__all__ = ["train", "TrainingDiverged", "VAL_CURVE", "config_diff", "Setting", "StreamSetting", "FiniteSetting",
           "GAP_BUDGET"]

VAL_CURVE = "val_curve.jsonl"  # periodic validation rows (log.eval_every > 0)
GAP_BUDGET = 50_000_000  # float64 entries (400 MB) of a finite set's per-task systems H_t for logging J − J*


def config_diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in config_diff(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [f"{where[:-1]}: {a!r} → {b!r}"]


class _TensorBoard:
    def __init__(self, run_dir: Path, mode: str | bool):
        self.writer = None
        if mode in (False, "false", "off"):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if mode is True or mode == "true":
                raise ConfigError("log.tensorboard = true but tensorboard is not installed "
                                  "(pip install tensorboard, or set log.tensorboard = 'auto').") from None
            return
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----- settings: what a task stream and a finite task set give the one loop ------------------------------------
class Setting(Protocol):
    """What the loop asks of a kind of run. Built with ``(cfg, run_dir, reducer, resume, resume_from, progress)``:
    the learner, its checkpoint loaded when resuming (``meta``: that checkpoint's JSON, or {})."""

    learner: Any
    meta: dict[str, Any]
    log_first_step: bool  # a metrics row after step 1 too, not only every log.every steps
    tasks_per_step: int  # for val_curve's tasks_seen
    validate: Callable[[], dict[str, Any]] | None  # periodic validation (log.eval_every > 0), else None

    def draw(self) -> Any:
        """The ``tasks`` argument of this step's ``learner.step``."""

    def logged(self) -> dict[str, Any]:
        """Values a metrics row holds besides the step's diagnostics."""

    def watch(self, step: int, row: dict[str, Any] | None, diag: dict[str, Any]) -> None:
        """Raise :class:`TrainingDiverged` if the run grows out of bounds (``row``: None on unlogged steps)."""

    def save(self, extra: dict[str, Any]) -> None:
        """Write a checkpoint of the learner (and whatever draws its tasks) with ``extra`` in its JSON."""

    def evaluate(self) -> dict[str, Any]:
        """The final evaluation (written into the run directory); {} on ranks other than 0."""


class StreamSetting:
    """An infinite task stream: a fresh minibatch of the config's task family every step.

    Checkpoints hold the meta state and the task-sampling generator (``save_checkpoint``; ``--resume-from STEP``
    any kept one); a new run may first pretrain its backbone. Validation: :class:`PeriodicValidation`; the final
    evaluation: :func:`evaluate_run` and the run's plots."""

    log_first_step = True  # the learning curve starts at step 1

    def __init__(self, cfg: dict[str, Any], run_dir: Path, reducer: Reducer, resume: bool,
                 resume_from: int | None, progress: bool | None):
        self.cfg, self.run_dir, self.reducer = cfg, run_dir, reducer
        self.learner = build_learner(cfg)
        self.learner.reducer = reducer
        self.family = build_family(cfg)
        self.sampler = torch.Generator().manual_seed(cfg["seed"])
        self.tasks_per_step = cfg["outer"]["meta_batch"]
        self.meta: dict[str, Any] = {}
        if resume:
            state, self.meta = load_checkpoint(run_dir, resume_from)
            self.learner.load_state_dict(state)
            self.sampler.set_state(decode_rng(self.meta["sampler"]))
        elif cfg["pretrain"]["epochs"] > 0 or cfg["pretrain"]["backbone"]:
            if reducer.world_size > 1:
                raise ConfigError("pretraining runs in one process; pretrain first (a run with outer.steps = 1), "
                                  "then meta-train under torchrun.")
            backbone, summary = pretrain_backbone(cfg, self.family, run_dir, progress=bool(progress))
            start_from_backbone(self.learner, backbone)
            self.meta = {"pretrain_seconds": float(summary["seconds"]), "elapsed": float(summary["seconds"])}
        self.validate: Callable[[], dict[str, Any]] | None = None
        if cfg["log"]["eval_every"]:
            periodic = PeriodicValidation(cfg)
            self.validate = lambda: periodic(self.learner)

    def draw(self) -> Any:
        """This step's tasks (under torchrun only this rank's share: same draws from the sampler, same tasks)."""
        mb = self.tasks_per_step
        if self.reducer.world_size > 1:
            return self.family.train_share(mb, self.sampler, self.reducer.part(mb))
        return self.family.train_batch(mb, self.sampler)

    def logged(self) -> dict[str, Any]:
        return {}

    def watch(self, step: int, row: dict[str, Any] | None, diag: dict[str, float]) -> None:
        """No growth guard: a stream's losses and meta-gradients vary with the random tasks of each step."""

    def save(self, extra: dict[str, Any]) -> None:
        if self.reducer.rank == 0:
            save_checkpoint(self.run_dir, self.learner.state_dict(),
                            {"sampler": encode_rng(self.sampler.get_state()), **extra})

    def evaluate(self) -> dict[str, Any]:
        if self.reducer.rank != 0:
            return {}
        from metaprox.plots import plot_run  # matplotlib only once a run is complete

        result = evaluate_run(self.run_dir, learner=self.learner, cfg=self.cfg)
        bad = nonfinite_evaluation(result)
        if bad is not None:  # parameters finite but so large that the prior's predictions overflow
            raise TrainingDiverged(diverged_message(self.learner.step_count, f"{bad} (outer.lr = "
                                                    f"{self.cfg['outer']['lr']:g} too large?); eval.json records it",
                                                    self.run_dir))
        plot_run(self.run_dir, learner=self.learner, cfg=self.cfg)
        return result


class FiniteSetting:
    """A finite task set (``algorithm = "finite_mmp"``): every step a minibatch of its task indices (the
    learner's sampler draws them), per-task rows kept in rank-sharded stores.

    Checkpoints: :func:`metaprox.sharded.save` (a collective: meta state and every rank's shard commit together;
    only the last one can be resumed). Metrics rows add J (and J*, J − J* where there is a closed form); the
    :class:`~metaprox.stability.DivergenceGuard` watches J and, for gradient center steps, the meta-gradient norm.
    Validation and the final evaluation: :func:`metaprox.finite_eval.finite_result` on the validation rows (the
    final one on the test rows when there are none). Every rank takes part in them (they all-reduce). With
    ``task.kinds`` the learner is :func:`metaprox.finite_kinds.open_kinds_learner`'s and the records are
    :func:`metaprox.finite_eval.kinds_result`'s (per kind)."""

    log_first_step = False  # rows every log.every steps (a guard reference from the first of them)

    def __init__(self, cfg: dict[str, Any], run_dir: Path, reducer: Reducer, resume: bool,
                 resume_from: int | None, progress: bool | None):
        if resume_from is not None:  # its task stores hold the last checkpoint's step only
            raise ConfigError("--resume-from is not supported for finite_mmp runs; use --resume.")
        self.cfg, self.run_dir, self.reducer = cfg, run_dir, reducer
        # tables of several kinds around a shared trunk (metaprox.finite_kinds), or one table
        self.fd: FiniteData | FiniteKinds = load_kinds(cfg) if cfg["task"]["kinds"] else load_finite_data(cfg)
        fd = self.fd
        for part in fd.parts if isinstance(fd, FiniteKinds) else [fd]:
            check_auc_classes(part, cfg["eval"]["metrics"])
        if cfg["log"]["eval_every"] and not fd.has("val"):
            raise ConfigError(f"log.eval_every = {cfg['log']['eval_every']}: {fd.source} has no validation rows; set "
                              f"task.val_frac > 0 (or a split column with 'val' rows), or log.eval_every = 0.")
        if isinstance(fd, FiniteKinds):
            self.learner = learner = open_kinds_learner(cfg, fd, run_dir, reducer, resume)
        else:
            train = fd.tasks("train")
            layout = sharded.layout_of(finite_model(cfg, train[0].x.shape[1], fd.outputs))
            store = sharded.open_shard(run_dir, layout, len(train), reducer, resume=resume)
            self.learner = learner = build_finite(cfg, train, fd, store)
        learner.reducer = reducer
        if isinstance(learner, (FiniteMMP, FiniteMultiHeadMMP)):  # MMP's envelope step: ηλ ≥ 2 overshoots
            check_outer_step(cfg, float(learner.task_scale.double().mean()))  # per-task pulls λ_t = s_t·λ
        self.guard = DivergenceGuard(cfg["finite"]["divergence_growth"])
        self.drives = cfg["finite"]["center_update"] == "gradient"  # else the meta-gradient may sit at round-off
        every = len(keeper_of(learner).tasks)
        self.tasks_per_step = every if cfg["finite"]["sample"] == "all" else cfg["outer"]["meta_batch"]
        self.meta = sharded.load(run_dir, learner) if resume else {}
        self.j_star = self._closed_form(start=not resume)
        self.validate: Callable[[], dict[str, Any]] | None = None
        if cfg["log"]["eval_every"]:
            self.validate = self._validation

    def _result(self, split: str) -> dict[str, Any]:
        """The evaluation record of ``split`` (a set of kinds: per kind)."""
        if isinstance(self.fd, FiniteKinds):
            return kinds_result(self.cfg, self.learner, self.fd, split)
        return finite_result(self.cfg, self.learner, self.fd, split)

    def _validation(self) -> dict[str, Any]:
        """J, the headline number and the pooled and task-mean metrics of the validation rows (no per-task list;
        a set of kinds: each keyed by kind)."""
        r = self._result("val")
        return {"J": r["J"], "val": r["val"], "pooled": r["eval"]["pooled"], "task_mean": r["eval"]["task_mean"]}

    def _closed_form(self, start: bool) -> float | None:
        """J* where the joint optimum has a closed form (linear least squares, :mod:`metaprox.joint_ridge`), else
        None (also when the n per-task systems would exceed :data:`GAP_BUDGET` entries: no gap is logged then).
        ``finite.center_update = "solve"``: the optimum is written into the learner at the start (every rank
        solves the whole small system and writes the rows it owns); the solved center is then kept fixed."""
        learner = self.learner
        if not isinstance(learner, FiniteMMP):
            return None  # a rule's TaskMemory: no joint objective (finite.rule = "mmp" only; config refuses "solve")
        why = joint_ridge.applies_to(learner)
        if self.cfg["finite"]["center_update"] == "solve":
            if why is not None:
                raise ConfigError(f"finite.center_update = 'solve' needs the closed-form joint optimum of linear "
                                  f"least-squares tasks, but {why}: use 'exact' or 'gradient'.")
            if start:
                return joint_ridge.apply_to(learner, learner.owned_range()).objective
        big = len(learner.tasks) * learner.layout.numel ** 2 > GAP_BUDGET  # the per-task systems would not fit
        return None if why is not None or big else joint_ridge.solve_learner(learner).objective

    def draw(self) -> None:
        return None  # the learner's sampler draws the task indices (and keeps its state in the checkpoint)

    def logged(self) -> dict[str, Any]:
        if not hasattr(self.learner, "objective"):
            return {"J": None}  # a rule's TaskMemory: no joint objective
        objective = self.learner.objective()  # a collective
        gap = {} if self.j_star is None else {"J_star": self.j_star, "gap": objective - self.j_star}
        return {"J": objective, **gap}

    def watch(self, step: int, row: dict[str, Any] | None, diag: dict[str, Any]) -> None:
        """The growth guard: J on logged steps, the meta-gradient norm every step (gradient center steps only)."""
        self.guard.check(step, J=row["J"] if row else None,
                         meta_grad_norm=diag["meta_grad_norm"] if self.drives else None)

    def save(self, extra: dict[str, Any]) -> None:
        sharded.save(self.run_dir, self.learner, extra)  # a collective: every rank commits its shard

    def evaluate(self) -> dict[str, Any]:
        result = self._result("val" if self.fd.has("val") else "test")
        if self.reducer.rank != 0:
            return {}
        write_eval(self.run_dir, result)
        return result


# ----- the one loop -------------------------------------------------------------------------------------------
def train(cfg: dict[str, Any], out_dir: str | Path, resume: bool | str = False, progress: bool | None = None,
          evaluate: bool = True, stop_at: int | None = None, max_seconds: float | None = None,
          resume_from: int | None = None) -> dict[str, Any]:
    """Run (or resume) meta-training; returns the final evaluation (or {} if ``evaluate`` is False, and on
    ranks other than 0).

    ``resume``: False (new run), True (continue from the last checkpoint) or ``"auto"`` (continue if there is a
    checkpoint, else start). ``stop_at`` ends the session after that many outer iterations (with a
    checkpoint), as an interruption would; a later ``resume=True`` call continues to ``outer.steps``.
    ``max_seconds`` does the same once this session has trained for that long (wall clock), e.g. to fit a
    fixed time budget. ``resume_from``: continue from the kept checkpoint of that step instead of the last one
    (``--resume-from``; implies ``resume``; task streams only).
    """
    validate_run(cfg, out_dir, evaluate=evaluate)  # every problem of the config, data and --out, before any work
    with process_group(cfg["device"]) as reducer, run_lock(out_dir, enabled=reducer.rank == 0):
        return _train(cfg, Path(out_dir), resume or resume_from is not None, progress, evaluate, stop_at,
                      max_seconds, reducer, resume_from)


def _resuming(cfg: dict[str, Any], run_dir: Path, resume: bool | str) -> bool:
    """Whether this session continues the run in ``run_dir`` (refusing a mismatch of flag, checkpoint, config)."""
    has_ckpt = (run_dir / "checkpoint.json").is_file()
    if resume == "auto":
        resume = has_ckpt
    if has_ckpt and not resume:
        hint = " (a torchrun restart: launch with --auto-resume)" if is_restart() else ""
        raise ConfigError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it or choose "
                          f"another --out.{hint}")
    if resume and not has_ckpt:
        raise CheckpointError(f"--resume: no checkpoint in {str(run_dir)!r} yet; start without --resume.")
    if resume:
        changed = [d for d in config_diff(read_config(run_dir), cfg) if not d.startswith(("log.", "eval.", "threads:"))]
        if changed:
            raise ConfigError("cannot resume with a different config; changed: " + "; ".join(changed))
    return bool(resume)


def _train(cfg: dict[str, Any], run_dir: Path, resume: bool | str, progress: bool | None, evaluate: bool,
           stop_at: int | None, max_seconds: float | None, reducer: Reducer,
           resume_from: int | None = None) -> dict[str, Any]:
    main = reducer.rank == 0  # only rank 0 writes files (no barrier: every rank holds the same state)
    if max_seconds is not None and reducer.world_size > 1:
        raise ConfigError("a wall-clock budget (max_seconds) would stop ranks at different steps; use "
                          "outer.steps (or stop_at) in distributed runs.")
    resume = _resuming(cfg, run_dir, resume)
    log = cfg["log"]
    show = log["progress"] if progress is None else progress
    kind = FiniteSetting if cfg["algorithm"] == "finite_mmp" else StreamSetting
    setting: Setting = kind(cfg, run_dir, reducer, resume, resume_from, progress)
    learner: MetaLearner = setting.learner
    # training clock: pretraining (if any) + meta-training, in seconds
    elapsed0 = float(setting.meta.get("elapsed", 0.0))
    pretrain_seconds = float(setting.meta.get("pretrain_seconds", 0.0))
    if isinstance(reducer, AllReduceReducer):  # every rank must start from the same state (also a sync point:
        reducer.check_same(learner.step_count, "the step to start from")  # no rank writes before all looked)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
    rows = [r for r in read_metrics(run_dir) if r["step"] <= learner.step_count] if resume else []
    if rows:  # the guard's reference values: those of the first logged row, as in the uninterrupted run
        setting.watch(int(rows[0]["step"]), rows[0], rows[0])
    validate = setting.validate
    val_rows = [r for r in read_metrics(run_dir, VAL_CURVE) if r["step"] <= learner.step_count] if resume else []
    total = cfg["outer"]["steps"]
    tb = _TensorBoard(run_dir, log["tensorboard"] if main else False)
    t0 = time.perf_counter()

    def checkpoint() -> None:  # on every rank (a finite set's shards commit together)
        # the logs first: a resume keeps their rows up to the checkpoint's step, so rows written ahead of a
        # checkpoint that never commits are dropped, while rows written after the commit would be lost by a
        # death in between
        if main:
            write_metrics(run_dir, rows)
            if validate is not None:
                write_metrics(run_dir, val_rows, VAL_CURVE)
        setting.save({"elapsed": elapsed0 + time.perf_counter() - t0, "pretrain_seconds": pretrain_seconds})

    def validation() -> None:  # its time is excluded from the training clock (t0 moves forward)
        nonlocal t0
        start = time.perf_counter()
        result = validate()  # type: ignore[misc]
        seconds = time.perf_counter() - start
        val_rows.append({"step": learner.step_count, "time": elapsed0 + start - t0, "eval_seconds": seconds,
                         "tasks_seen": learner.step_count * setting.tasks_per_step, **result})
        t0 += seconds

    def diverged(step: int, what: str) -> TrainingDiverged:  # the log up to the failing step is kept
        if main:
            write_metrics(run_dir, rows)
        return TrainingDiverged(diverged_message(step, what, run_dir))

    bar = tqdm(total=total, initial=learner.step_count, disable=not (show and main), desc=cfg["name"], unit="it",
               dynamic_ncols=True, file=sys.stderr)
    budget = 60.0 * cfg["outer"]["minutes"] if cfg["outer"]["minutes"] > 0 else None
    out_of_time = False  # outer.minutes of meta-training spent: the run is complete (and evaluated)
    try:
        end = total if stop_at is None else min(total, stop_at)
        if validate is not None and learner.step_count == 0 and not val_rows:
            validation()
        while learner.step_count < end:
            s = learner.step_count
            if budget is not None:
                spent = elapsed0 + time.perf_counter() - t0 - pretrain_seconds  # meta-training seconds so far
                if reducer.world_size > 1:  # one clock for all ranks (their mean), so they stop together
                    spent = reducer.sum([], {"spent": spent})[1]["spent"] / reducer.world_size
                out_of_time = spent > budget
                if learner.schedule == "linear" and s > 0:
                    # the linear decay spans the budget: horizon = the steps that fit at the speed measured so far
                    learner.total_steps = min(total, max(s + 1, int(s * budget / max(spent, 1e-9))))
            if out_of_time or (max_seconds is not None and time.perf_counter() - t0 > max_seconds):
                if validate is not None and val_rows[-1]["step"] != s:
                    validation()
                checkpoint()
                break
            monitor = (s == 0 and setting.log_first_step) or (s + 1) % log["every"] == 0 or s + 1 == total
            try:  # a NaN/inf is raised on every rank alike (the meta-gradient is all-reduced)
                diag = learner.step(setting.draw(), monitor=monitor)
            except NonFiniteError as e:
                raise diverged(s, str(e).rstrip(".")) from e
            bad = first_nonfinite(zip(learner.names, learner.fmodel.params(), strict=True))  # same on every rank
            if bad is not None:  # caught before any checkpoint holds it: the last one written is finite
                raise diverged(s, f"parameter {bad} is not finite after outer step {s + 1} (outer.lr = "
                                  f"{cfg['outer']['lr']:g} too large?)")
            row = None
            if monitor:
                row = {**diag, "step": learner.step_count, **setting.logged(),
                       "time": elapsed0 + time.perf_counter() - t0}
                rows.append(row)
                tb.log(row)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("phi", "J", "meta_grad_norm")
                                 if isinstance(row.get(k), float)}, refresh=False)
            try:
                setting.watch(learner.step_count, row, diag)
            except TrainingDiverged:
                if main:
                    write_metrics(run_dir, rows)
                raise
            if validate is not None and (learner.step_count % log["eval_every"] == 0 or learner.step_count == total):
                validation()
            if learner.step_count % log["checkpoint_every"] == 0 or learner.step_count == end:
                checkpoint()
            bar.update(1)
    finally:
        bar.close()
        tb.close()
    if not evaluate or (learner.step_count < total and not out_of_time):
        return {}
    return setting.evaluate()
