"""The training loop of a run: config → tasks → outer steps → metrics, checkpoints, evaluation, plots.

``train(cfg, out_dir)`` starts a run; ``train(cfg, out_dir, resume=True)`` continues it from its last
checkpoint, bitwise identical (on CPU) to an uninterrupted run: the task-sampling and inner-minibatch
generators, optimizer state and step counter are all checkpointed.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``) the same function runs on every rank: all ranks draw
the same task minibatch (each builds only its share of it: ``family.train_share``), each solves its share, one
all-reduce combines them (:mod:`metaprox.distributed`);
only rank 0 writes the run directory. ``resume="auto"`` (``--auto-resume``) resumes when there is a checkpoint
and starts otherwise — what workers restarted by ``torchrun --max-restarts`` need. See docs/distributed.md.

With ``log.eval_every = N > 0`` the run also validates every N iterations (and at iteration 0) on a few
validation tasks (``log.eval_tasks`` per shot setting) and writes ``val_curve.jsonl``; the time this takes is
excluded from the training clock (``time`` in metrics and val_curve rows), so error-vs-time curves show
training seconds only, and training itself is unchanged by it (same RNG streams).

With ``pretrain.epochs > 0`` a new run first pretrains the backbone with cross-entropy on all training classes
(:mod:`metaprox.pretrain`) and meta-trains from it; the training clock then includes the pretraining seconds.
``outer.minutes > 0`` ends meta-training after that many minutes (not counting pretraining or validation) and
evaluates the run as if it had reached ``outer.steps``; a linear outer schedule then decays over the budget (its
horizon re-estimated every step from the measured speed, capped at ``outer.steps``), so such a run depends on the
machine's speed and is not bitwise reproducible.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from metaprox.algorithms.base import NonFiniteError
from metaprox.build import build_family, build_learner
from metaprox.checkpoint import CheckpointError, decode_rng, encode_rng, load_checkpoint, save_checkpoint
from metaprox.config import ConfigError
from metaprox.distributed import AllReduceReducer, Reducer, is_restart, process_group
from metaprox.evaluate import PeriodicValidation
from metaprox.nonfinite import diverged_message, first_nonfinite, nonfinite_evaluation
from metaprox.pretrain import pretrain_backbone, start_from_backbone
from metaprox.rundir import read_config, read_metrics, write_config, write_metrics
from metaprox.runlock import run_lock
from metaprox.validate import validate_run

__all__ = ["train", "TrainingDiverged", "VAL_CURVE", "config_diff"]

VAL_CURVE = "val_curve.jsonl"  # periodic validation rows (log.eval_every > 0)


class TrainingDiverged(RuntimeError):
    """Training hit a NaN/inf; the run directory keeps its last good checkpoint."""


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
    (``--resume-from``; implies ``resume``).
    """
    validate_run(cfg, out_dir, evaluate=evaluate)  # every problem of the config, data and --out, before any work
    with process_group(cfg["device"]) as reducer, run_lock(out_dir, enabled=reducer.rank == 0):
        if cfg["algorithm"] == "finite_mmp":
            from metaprox.train_finite import train_finite

            if max_seconds is not None:
                raise ConfigError("a wall-clock budget (max_seconds) is not supported for finite_mmp runs.")
            if resume_from is not None:  # its task stores hold the last checkpoint's step only
                raise ConfigError("--resume-from is not supported for finite_mmp runs; use --resume.")
            return train_finite(cfg, Path(out_dir), resume, progress, evaluate, stop_at, reducer)
        return _train(cfg, Path(out_dir), resume or resume_from is not None, progress, evaluate, stop_at, max_seconds,
                      reducer, resume_from)


def _train(cfg: dict[str, Any], run_dir: Path, resume: bool | str, progress: bool | None, evaluate: bool,
           stop_at: int | None, max_seconds: float | None, reducer: Reducer,
           resume_from: int | None = None) -> dict[str, Any]:
    main = reducer.rank == 0  # only rank 0 writes files (no barrier: every rank holds the same state)
    if max_seconds is not None and reducer.world_size > 1:
        raise ConfigError("a wall-clock budget (max_seconds) would stop ranks at different steps; use "
                          "outer.steps (or stop_at) in distributed runs.")
    has_ckpt = (run_dir / "checkpoint.json").is_file()
    if resume == "auto":
        resume = has_ckpt
    if has_ckpt and not resume:
        hint = " (a torchrun restart: launch with --auto-resume)" if is_restart() else ""
        raise ConfigError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it or choose "
                          f"another --out.{hint}")
    if resume and has_ckpt:
        stored = read_config(run_dir)
        changed = [d for d in config_diff(stored, cfg) if not d.startswith(("log.", "eval.", "threads:"))]
        if changed:
            raise ConfigError("cannot resume with a different config; changed: " + "; ".join(changed))

    learner = build_learner(cfg)
    learner.reducer = reducer
    family = build_family(cfg)
    sampler = torch.Generator().manual_seed(cfg["seed"])
    rows: list[dict[str, Any]] = []
    elapsed0 = pretrain_seconds = 0.0  # training clock: pretraining (if any) + meta-training, in seconds
    if resume and has_ckpt:
        state, meta = load_checkpoint(run_dir, resume_from)
        learner.load_state_dict(state)
        sampler.set_state(decode_rng(meta["sampler"]))
        elapsed0 = float(meta.get("elapsed", 0.0))
        pretrain_seconds = float(meta.get("pretrain_seconds", 0.0))
        rows = [r for r in read_metrics(run_dir) if r["step"] <= state["step"]]
    elif resume:
        raise CheckpointError(f"--resume: no checkpoint in {str(run_dir)!r} yet; start without --resume.")
    elif cfg["pretrain"]["epochs"] > 0 or cfg["pretrain"]["backbone"]:
        if reducer.world_size > 1:
            raise ConfigError("pretraining runs in one process; pretrain first (a run with outer.steps = 1), then "
                              "meta-train under torchrun.")
        backbone, summary = pretrain_backbone(cfg, family, run_dir, progress=bool(progress))
        start_from_backbone(learner, backbone)
        elapsed0 = pretrain_seconds = float(summary["seconds"])
    if isinstance(reducer, AllReduceReducer):  # every rank must start from the same state (also a sync point:
        reducer.check_same(learner.step_count, "the step to start from")  # no rank writes before all looked)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)

    total, mb, log = cfg["outer"]["steps"], cfg["outer"]["meta_batch"], cfg["log"]
    sharded = reducer.world_size > 1
    show = log["progress"] if progress is None else progress
    tb = _TensorBoard(run_dir, log["tensorboard"] if main else False)
    validate = PeriodicValidation(cfg) if log["eval_every"] else None
    val_rows = [r for r in read_metrics(run_dir, VAL_CURVE) if r["step"] <= learner.step_count] if resume else []
    t0 = time.perf_counter()

    def checkpoint() -> None:
        if not main:
            return
        # the logs first: a resume keeps their rows up to the checkpoint's step, so rows written ahead of a
        # checkpoint that never commits are dropped, while rows written after the commit would be lost by a
        # death in between
        write_metrics(run_dir, rows)
        if validate is not None:
            write_metrics(run_dir, val_rows, VAL_CURVE)
        save_checkpoint(run_dir, learner.state_dict(),
                        {"sampler": encode_rng(sampler.get_state()), "elapsed": elapsed0 + time.perf_counter() - t0,
                         "pretrain_seconds": pretrain_seconds})

    def validation() -> None:  # its time is excluded from the training clock (t0 moves forward)
        nonlocal t0
        start = time.perf_counter()
        result = validate(learner)  # type: ignore[misc]
        seconds = time.perf_counter() - start
        val_rows.append({"step": learner.step_count, "time": elapsed0 + start - t0, "eval_seconds": seconds,
                         "tasks_seen": learner.step_count * mb, **result})
        t0 += seconds

    from tqdm import tqdm

    bar = tqdm(total=total, initial=learner.step_count, disable=not (show and main), desc=cfg["name"], unit="it",
               dynamic_ncols=True, file=sys.stderr)
    budget = 60.0 * cfg["outer"]["minutes"] if cfg["outer"]["minutes"] > 0 else None
    out_of_time = False  # outer.minutes of meta-training spent: the run is complete (and evaluated)
    try:
        end = total if stop_at is None else min(total, stop_at)
        if validate is not None and learner.step_count == 0 and not val_rows:
            validation()
        while learner.step_count < end:
            spent = elapsed0 + time.perf_counter() - t0 - pretrain_seconds  # meta-training seconds so far
            out_of_time = budget is not None and spent > budget
            if budget is not None and learner.schedule == "linear" and learner.step_count > 0:
                # the linear decay spans the budget: horizon = the steps that fit at the speed measured so far
                learner.total_steps = min(total, max(learner.step_count + 1,
                                                     int(learner.step_count * budget / max(spent, 1e-9))))
            if out_of_time or (max_seconds is not None and time.perf_counter() - t0 > max_seconds):
                if validate is not None and val_rows[-1]["step"] != learner.step_count:
                    validation()
                checkpoint()
                break
            s = learner.step_count
            monitor = s == 0 or (s + 1) % log["every"] == 0 or s + 1 == total
            # under torchrun build only this rank's share (same draws from the sampler, same tasks)
            tasks = family.train_share(mb, sampler, reducer.part(mb)) if sharded else family.train_batch(mb, sampler)
            try:
                diag = learner.step(tasks, monitor=monitor)
            except NonFiniteError as e:  # raised on every rank alike (the meta-gradient is all-reduced)
                if main:
                    write_metrics(run_dir, rows)
                raise TrainingDiverged(diverged_message(s, str(e).rstrip("."), run_dir)) from e
            bad = first_nonfinite(zip(learner.names, learner.fmodel.params(), strict=True))  # same on every rank
            if bad is not None:  # caught before any checkpoint holds it: the last one written is finite
                if main:
                    write_metrics(run_dir, rows)
                raise TrainingDiverged(diverged_message(
                    s, f"parameter {bad} is not finite after outer step {s + 1} (outer.lr = {cfg['outer']['lr']:g} "
                       f"too large?)", run_dir))
            if monitor:
                row = {**diag, "step": learner.step_count, "time": elapsed0 + time.perf_counter() - t0}
                rows.append(row)
                tb.log(row)
                bar.set_postfix(phi=f"{diag['phi']:.3g}", grad=f"{diag['meta_grad_norm']:.2g}", refresh=False)
            if validate is not None and (learner.step_count % log["eval_every"] == 0 or learner.step_count == total):
                validation()
            if learner.step_count % log["checkpoint_every"] == 0 or learner.step_count == end:
                checkpoint()
            bar.update(1)
    finally:
        bar.close()
        tb.close()
    if not evaluate or (learner.step_count < total and not out_of_time) or not main:
        return {}
    from metaprox.evaluate import evaluate_run
    from metaprox.plots import plot_run

    result = evaluate_run(run_dir, learner=learner, cfg=cfg)
    bad = nonfinite_evaluation(result)
    if bad is not None:  # parameters finite but so large that the prior's predictions overflow
        raise TrainingDiverged(diverged_message(learner.step_count, f"{bad} (outer.lr = {cfg['outer']['lr']:g} too "
                                                                   f"large?); eval.json records it", run_dir))
    plot_run(run_dir, learner=learner, cfg=cfg)
    return result
