"""Prox penalties D(v, c): how strongly a task's parameters v are pulled toward their center c.

The inner problem of every task is ``min_v L_T(v) + D(v, c)``. By the envelope theorem the gradient of the
Moreau envelope φ_T(c) = min_v L_T(v) + D(v, c) with respect to the center is ``∂_c D(v*, c)`` — for the
squared ℓ2 penalty of the paper, ``λ (c − v*)`` (Lemma 1 of Zhou et al. 2019). So a penalty provides
its value, its gradient in v (for the inner solver) and its gradient in c (the meta-gradient).

Tensors are lists aligned with a parameter-name list; v carries a leading task axis, c broadcasts against it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["SquaredL2", "NoProx", "make_prox"]

Tensors = list[torch.Tensor]


def _per_task_sqnorm(diff: Tensors) -> torch.Tensor:
    """Σ over all parameter entries of diff², one value per task (leading axis)."""
    return sum(d.square().flatten(1).sum(1) for d in diff)  # type: ignore[return-value]


class SquaredL2:
    """The paper's penalty ``(λ/2)·‖v − c‖²``, summed over *all* parameter entries.

    ``lam`` is a positive number, or a mapping from glob patterns over parameter names to λ (first match
    wins, e.g. ``{"head.*": 0.1, "*": 1.0}``) for per-group pull strength. Every parameter must match a pattern.

    Note: the official TF1 code of the paper weights each tensor by an accidental per-tensor mean; we implement
    the penalty as written in the paper (a plain sum).
    """

    def __init__(self, lam: float | Mapping[str, float], names: Sequence[str]):
        self.names = list(names)
        self.lams = [self._lookup(lam, n) for n in self.names]

    @staticmethod
    def _lookup(lam: float | Mapping[str, float], name: str) -> float:
        if isinstance(lam, Mapping):
            for pattern, value in lam.items():
                if fnmatch.fnmatchcase(name, pattern):
                    return SquaredL2._check(value, f"lam[{pattern!r}]")
            raise ValueError(f"parameter {name!r} matches none of the λ patterns {list(lam)}; "
                             f"add a catch-all pattern '*'.")
        return SquaredL2._check(lam, "lam")

    @staticmethod
    def _check(value: float, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{what} must be a number, got {type(value).__name__}.")
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{what} = {value}: the prox weight λ must be a finite number > 0 "
                             f"(λ ≤ 0 makes the inner problem unbounded or uncoupled from the prior).")
        return value

    @property
    def uniform(self) -> float | None:
        return self.lams[0] if len(set(self.lams)) == 1 else None

    def value(self, v: Tensors, c: Tensors) -> torch.Tensor:
        diff = torch._foreach_sub(v, c)
        return 0.5 * sum(lam * d.square().flatten(1).sum(1) for lam, d in zip(self.lams, diff))

    def grad_v(self, v: Tensors, c: Tensors) -> Tensors:
        return torch._foreach_mul(torch._foreach_sub(v, c), self.lams)

    def add_grad_v_(self, g: Tensors, v: Tensors, c: Tensors) -> None:
        """g += ∂_v D(v, c), in place (hot path of every inner step)."""
        torch._foreach_add_(g, torch._foreach_mul(torch._foreach_sub(v, c), self.lams))

    def grad_c(self, v: Tensors, c: Tensors) -> Tensors:
        return torch._foreach_mul(torch._foreach_sub(c, v), self.lams)

    def sqdist(self, v: Tensors, c: Tensors) -> torch.Tensor:
        return _per_task_sqnorm(torch._foreach_sub(v, c))


class NoProx(SquaredL2):
    """No penalty: ``D(v, c) = 0``, i.e. the squared ℓ2 penalty with λ = 0 for every parameter.

    The inner problem becomes plain empirical risk minimisation ``min_v L_T(v)``, started at the center — the
    inner loop of Reptile (Nichol et al. 2018), FOMAML and MAML (Finn et al. 2017), whose only coupling to the
    prior is the warm start and the finite number of steps. ``SquaredL2`` refuses λ = 0 because the *prox*
    rules (MMP, iMAML) need λ > 0; this class is the explicit opt-out. Its value and gradients are exactly
    zero (``add_grad_v_`` is a no-op, so inner steps cost nothing extra), while :meth:`sqdist` still reports
    ‖v − c‖² for the monitors. Build it with ``make_prox(None, names)``, i.e. ``lam=None`` in the learners.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.lams = [0.0] * len(self.names)

    def add_grad_v_(self, g: Tensors, v: Tensors, c: Tensors) -> None:
        """No penalty, nothing to add."""


def make_prox(lam: float | Mapping[str, float] | SquaredL2 | None, names: Sequence[str]) -> SquaredL2:
    """The penalty for ``lam``: :class:`SquaredL2` (a number or ``{glob: λ}``), :class:`NoProx` for None."""
    if lam is None:
        return NoProx(names)
    if isinstance(lam, SquaredL2):
        if lam.names != list(names):
            raise ValueError("the prox penalty was built for other parameter names than the model's.")
        return lam
    return SquaredL2(lam, names)
