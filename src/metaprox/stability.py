"""Stability of the outer iteration: refuse a step size that cannot converge, stop a run that diverges.

The outer step (``outer.lr``) is η: plain SGD moves the center by η times the meta-gradient, and MMP's
meta-gradient is the envelope gradient ∇φ_T(w) = λ(w − v_T). So one step moves w the fraction ηλ of the way to
the (batch-mean) solution v̄ — ηλ = 1 lands on it (Reptile's outer step 1). Each φ_T is λ-smooth, so plain
gradient steps on w are stable in general only for ηλ < 2; with ηλ ≥ 2 the iterates overshoot by a growing
factor (on a finite set with ηλ = 5 the joint objective reached ~1e65). :func:`check_outer_step` refuses that
unless ``outer.allow_unstable = true``; :class:`DivergenceGuard` stops a run whose objective or meta-gradient
norm grows by orders of magnitude, whether or not the step was logged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from metaprox.config import ConfigError
from metaprox.nonfinite import TrainingDiverged

__all__ = ["outer_interpolation", "check_outer_step", "UnstableOuterStep", "DivergenceGuard"]


def _max_lam(lam: Any) -> float:
    """The largest numeric λ of ``prox.lam`` (a number, or a table whose "shared"/"private" entries do not pull)."""
    values = lam.values() if isinstance(lam, Mapping) else [lam]
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(nums, default=0.0)


def outer_interpolation(cfg: dict[str, Any], pull_scale: float = 1.0) -> float | None:
    """ηλ of a config's first (largest) outer step, or None where the rule is not a plain SGD step on an
    envelope gradient (other algorithms, Adam, finite centers that are not gradient steps). ``pull_scale``
    multiplies λ (a finite set's mean per-task factor s_t of ``finite.task_lam = "size"``)."""
    algo = cfg["algorithm"]
    if algo not in ("mmp", "finite_mmp") or cfg["outer"]["optimizer"] != "sgd":
        return None
    if algo == "finite_mmp" and cfg["finite"]["center_update"] != "gradient":
        return None
    return float(cfg["outer"]["lr"]) * _max_lam(cfg["prox"]["lam"]) * pull_scale


class UnstableOuterStep(ConfigError):
    """ηλ ≥ 2: a config error of its own kind, so a tuning study can prune such a trial (a joint property of the
    sampled η and λ) instead of stopping."""


def check_outer_step(cfg: dict[str, Any], pull_scale: float = 1.0) -> None:
    """Refuse ηλ ≥ 2 (see the module doc) unless ``outer.allow_unstable = true``."""
    rate = outer_interpolation(cfg, pull_scale)
    if rate is None or rate < 2.0 or cfg["outer"]["allow_unstable"]:
        return
    lam = _max_lam(cfg["prox"]["lam"]) * pull_scale
    scaled = f" (λ = {lam:.4g} with the mean per-task factor {pull_scale:.4g} of task_lam = 'size')" \
        if pull_scale != 1.0 else f" (λ = {lam:.4g})"
    raise UnstableOuterStep(f"outer.lr = {cfg['outer']['lr']:g} (η) gives an outer step ηλ = {rate:.4g}{scaled}: each "
                      f"step moves the center ηλ of the way to the tasks' solutions, which overshoots and diverges "
                      f"for ηλ ≥ 2. Use outer.lr < {2.0 / lam:.4g} (ηλ = 1 lands on the solutions' mean), or set "
                      f"outer.allow_unstable = true to run it anyway.")


class DivergenceGuard:
    """Stop when the objective or the meta-gradient norm grows by more than ``growth`` × its first value.

    ``check`` is called every step with the meta-gradient norm (computed every step; a finite-set run passes it
    for gradient center steps, the only ones it drives) and, on logged steps, the objective; a value that is not
    finite always stops. ``growth = 0`` turns the growth test off."""

    def __init__(self, growth: float = 1e4):
        if growth < 0:
            raise ConfigError(f"finite.divergence_growth = {growth}: use a factor > 1, or 0 to turn it off.")
        self.growth = float(growth)
        self.first: dict[str, float] = {}

    def check(self, step: int, **values: float | None) -> None:
        for name, value in values.items():
            if value is None:
                continue
            if not math.isfinite(value):
                raise TrainingDiverged(f"training diverged at outer step {step}: {name} = {value}.")
            ref = self.first.setdefault(name, abs(value))
            if self.growth and ref > 0 and abs(value) > self.growth * ref:
                raise TrainingDiverged(
                    f"training diverged at outer step {step}: {name} = {value:.4g} is {abs(value) / ref:.3g}× its "
                    f"first value {ref:.4g} (limit finite.divergence_growth = {self.growth:g}). Lower outer.lr "
                    f"(the outer step is ηλ = outer.lr × λ; < 2 is needed, ≈ 1 is a safe start).")

    def state(self) -> dict[str, float]:
        return dict(self.first)

    def load(self, state: Mapping[str, float]) -> None:
        self.first = {k: float(v) for k, v in state.items()}
