"""The guard against a diverged run: the meta-parameters are checked after every outer update, so a NaN/inf is
caught at the step that made it, before any checkpoint can hold it, and the message says which step, which
parameter, and which checkpoint (the last one written, all of whose tensors passed this check) is kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["TrainingDiverged", "first_nonfinite", "diverged_message", "nonfinite_evaluation"]


class TrainingDiverged(RuntimeError):
    """Training hit a NaN/inf (or grew past :class:`~metaprox.stability.DivergenceGuard`'s limit); the run
    directory keeps its last good checkpoint. ``metaprox train`` exits with status 3."""


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or ±inf, with what it holds (e.g. ``"'0.weight' (nan)"``);
    None if all are finite."""
    for name, t in named:
        if not bool(torch.isfinite(t).all()):
            kinds = [k for k, bad in (("nan", torch.isnan(t).any()), ("inf", torch.isinf(t).any())) if bad]
            return f"{name!r} ({'/'.join(kinds)})"
    return None


def diverged_message(step: int, what: str, run_dir: Path) -> str:
    """``training stopped at step S: WHAT. <which checkpoint is kept>`` for :class:`TrainingDiverged`."""
    try:
        kept = int(json.loads((run_dir / "checkpoint.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        kept = None
    where = str(run_dir)
    if kept is None:
        tail = (f"No checkpoint had been written yet, so there is nothing to resume in {where!r}; start again "
                f"(into a new --out) with a lower outer.lr / inner.lr or λ.")
    else:
        tail = (f"The last good checkpoint (step {kept}, all tensors finite) in {where!r} is kept; rerun into a new "
                f"--out with a lower outer.lr / inner.lr or λ (or resume it to reproduce).")
    return f"training stopped at step {step}: {what}. {tail}"


def nonfinite_evaluation(result: dict) -> str | None:
    """What is not finite in an evaluation result (``evaluate_run``) before any adaptation step — the learned
    prior itself: finite but huge parameters (an outer step far too large) whose predictions overflow — or None."""
    first = str(result["steps"][0])
    for name, rows in result["sets"].items():
        value = rows[first]["loss"]
        if value != value or value in (float("inf"), float("-inf")):
            return f"the test loss of the learned prior (after {first} steps) is {value} on {name!r}"
    return None
