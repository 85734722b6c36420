"""Prox penalties D(v, c): how strongly a task's parameters v are pulled toward their center c.

The inner problem of every task is ``min_v L_T(v) + D(v, c)``. By the envelope theorem the gradient of the
Moreau envelope φ_T(c) = min_v L_T(v) + D(v, c) with respect to the center is ``∂_c D(v*, c)`` — for the
squared ℓ2 penalty of the paper, ``λ (c − v*)`` (Lemma 1 of Zhou et al. 2019). So a penalty provides
its value, its gradient in v (for the inner solver) and its gradient in c (the meta-gradient).

Tensors are lists aligned with a parameter-name list; v carries a leading task axis, c broadcasts against it.

Beyond the paper (additive: ``SquaredL2`` and ``NoProx`` behave exactly as before; they now derive from the
small :class:`Penalty` base, which ``make_prox`` accepts):

- :class:`GroupL2` — per-group λ in ``[0, ∞]`` with the named cases ``"shared"`` (λ = ∞: tied to the center)
  and ``"private"`` (λ = 0: no pull, independent per task);
- :class:`TaskScaled` — any penalty with a per-task factor ``s_t`` (leading task axis): λ_{t,g} = s_t·λ_g;
- :class:`RobustL2` — the outlier-resistant ``(λ/2)·log(1 + ‖v − c‖²)`` whose envelope gradient
  ``λ(c − v)/(1 + ‖c − v‖²)`` is bounded, so a far-away outlier task cannot drag the prior.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch

__all__ = ["Penalty", "SquaredL2", "NoProx", "GroupL2", "TaskScaled", "RobustL2", "SHARED", "PRIVATE",
           "make_prox"]

Tensors = list[torch.Tensor]


def _per_task_sqnorm(diff: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over all parameter entries of diff², one value per task (leading axis)."""
    return cast(torch.Tensor, sum(d.square().flatten(1).sum(1) for d in diff))  # ≥ 1 group: a tensor, not 0


class Penalty:
    """Base of prox penalties D(v, c): ``names``, per-group ``lams`` and value/gradient methods (see module doc)."""

    names: list[str]
    lams: list[float]

    @property
    def uniform(self) -> float | None:
        """The one λ of every parameter group, or None (per-group, per-task or non-quadratic pulls)."""
        return None

    def value(self, v: Tensors, c: Tensors) -> torch.Tensor:
        raise NotImplementedError

    def grad_v(self, v: Tensors, c: Tensors) -> Tensors:
        raise NotImplementedError

    def add_grad_v_(self, g: Tensors, v: Tensors, c: Tensors) -> None:
        torch._foreach_add_(g, self.grad_v(v, c))

    def grad_c(self, v: Tensors, c: Tensors) -> Tensors:
        raise NotImplementedError

    def sqdist(self, v: Tensors, c: Tensors) -> torch.Tensor:
        return _per_task_sqnorm(torch._foreach_sub(v, c))


class SquaredL2(Penalty):
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
        return 0.5 * cast(torch.Tensor, sum(lam * d.square().flatten(1).sum(1)
                                           for lam, d in zip(self.lams, diff, strict=True)))

    def grad_v(self, v: Tensors, c: Tensors) -> Tensors:
        return list(torch._foreach_mul(torch._foreach_sub(v, c), self.lams))

    def add_grad_v_(self, g: Tensors, v: Tensors, c: Tensors) -> None:
        """g += ∂_v D(v, c), in place (hot path of every inner step)."""
        torch._foreach_add_(g, torch._foreach_mul(torch._foreach_sub(v, c), self.lams))

    def grad_c(self, v: Tensors, c: Tensors) -> Tensors:
        return list(torch._foreach_mul(torch._foreach_sub(c, v), self.lams))

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


def make_prox(lam: float | Mapping[str, float] | Penalty | None, names: Sequence[str]) -> Penalty:
    """The penalty for ``lam``: :class:`SquaredL2` (a number or ``{glob: λ}``), :class:`NoProx` for None,
    or a ready :class:`Penalty` (e.g. :class:`RobustL2`, :class:`GroupL2`) built for the same names."""
    if lam is None:
        return NoProx(names)
    if isinstance(lam, Penalty):
        if lam.names != list(names):
            raise ValueError("the prox penalty was built for other parameter names than the model's.")
        return lam
    return SquaredL2(lam, names)


SHARED = math.inf
"""λ of a ``shared`` parameter group: tied to the center (the inner solver must not move it)."""
PRIVATE = 0.0
"""λ of a ``private`` parameter group: no pull toward the center (independent per task)."""


def _task_view(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return s.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))


class GroupL2(SquaredL2):
    """Squared ℓ2 with per-group λ in ``[0, ∞]``: soft pull, ``"shared"`` (λ = ∞) or ``"private"`` (λ = 0).

    ``lam`` is a number or ``{glob: λ | "shared" | "private"}`` (first match wins). A *shared* group is the
    limit λ → ∞: the constraint ``v_g = c_g``; its penalty value and ``grad_v`` are 0 (the solver keeps it at
    the center by masking its data gradient, see :meth:`mask_shared_`), and its meta-gradient is the task-loss
    gradient ``∇_g L_T(v)`` — joint training — which the learner supplies (``grad_c`` returns 0 there).
    A *private* group is λ = 0: independent per task, meta-gradient 0 (never averaged into the center).

    ``lams`` holds the *finite* part used by the inherited methods (shared → 0); ``group_lams`` the true values.
    """

    def __init__(self, lam: float | str | Mapping[str, float | str], names: Sequence[str]):
        self.names = list(names)
        self.group_lams = [self._lookup_group(lam, n) for n in self.names]
        self.shared = [math.isinf(v) for v in self.group_lams]
        self.private = [v == 0.0 for v in self.group_lams]
        self.lams = [0.0 if sh else v for sh, v in zip(self.shared, self.group_lams, strict=True)]

    @staticmethod
    def _lookup_group(lam: float | str | Mapping[str, float | str], name: str) -> float:
        if isinstance(lam, Mapping):
            for pattern, value in lam.items():
                if fnmatch.fnmatchcase(name, pattern):
                    return GroupL2._check_group(value, f"lam[{pattern!r}]")
            raise ValueError(f"parameter {name!r} matches none of the λ patterns {list(lam)}; "
                             f"add a catch-all pattern '*'.")
        return GroupL2._check_group(lam, "lam")

    @staticmethod
    def _check_group(value: float | str, what: str) -> float:
        if isinstance(value, str):
            named = {"shared": SHARED, "private": PRIVATE}
            if value not in named:
                raise ValueError(f"{what} = {value!r}: use a number, 'shared' (λ = ∞) or 'private' (λ = 0).")
            return named[value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{what} must be a number, 'shared' or 'private', got {type(value).__name__}.")
        value = float(value)
        if math.isnan(value) or value < 0:
            raise ValueError(f"{what} = {value}: λ must be ≥ 0 (0 = 'private', inf = 'shared').")
        return value

    @property
    def uniform(self) -> float | None:
        vals = set(self.group_lams)
        return self.group_lams[0] if len(vals) == 1 and not any(self.shared) else None

    @property
    def any_shared(self) -> bool:
        return any(self.shared)

    def mask_shared_(self, g: Tensors) -> None:
        """Zero the gradient entries of shared groups in place (the inner solver then never moves them)."""
        for gi, sh in zip(g, self.shared, strict=True):
            if sh:
                gi.zero_()


class TaskScaled(Penalty):
    """A penalty with one extra factor per task: ``D_t(v, c) = s_t · D(v, c)`` (λ_{t,g} = s_t·λ_g).

    ``scale`` has shape ``(B,)`` and is aligned with the leading task axis of ``v``; the center ``c`` may carry
    the same axis. This is how the finite setting gives every task its own pull strength λ_t (constant, scaled
    with task size, user-given) and how graph coupling passes the summed pull ``λ_t + Σ_s λ_ts``.
    """

    base: Penalty
    scale: torch.Tensor

    def __init__(self, base: Penalty, scale: torch.Tensor):
        if isinstance(base, TaskScaled):
            scale, base = scale * base.scale, base.base
        scale = torch.as_tensor(scale).flatten()
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError("per-task λ factors must be finite and ≥ 0.")
        self.base, self.scale = base, scale
        self.names, self.lams = base.names, base.lams

    def __getattr__(self, item: str):  # shared/private/group_lams/mask_shared_ of a GroupL2 base
        if item == "base":
            raise AttributeError(item)
        return getattr(self.base, item)

    @property
    def uniform(self) -> float | None:
        return None

    def value(self, v: Tensors, c: Tensors) -> torch.Tensor:
        val = self.base.value(v, c)
        return val * self.scale.to(val.dtype)

    def grad_v(self, v: Tensors, c: Tensors) -> Tensors:
        return [g * _task_view(self.scale, g) for g in self.base.grad_v(v, c)]

    def add_grad_v_(self, g: Tensors, v: Tensors, c: Tensors) -> None:
        torch._foreach_add_(g, self.grad_v(v, c))

    def grad_c(self, v: Tensors, c: Tensors) -> Tensors:
        return [g * _task_view(self.scale, g) for g in self.base.grad_c(v, c)]

    def sqdist(self, v: Tensors, c: Tensors) -> torch.Tensor:
        return self.base.sqdist(v, c)


class RobustL2(Penalty):
    """Outlier-resistant pull ``D(v, c) = (λ/2)·log(1 + ‖v − c‖²/δ²)·δ²`` (δ = ``scale``, default 1).

    Near the center it is the paper's ``(λ/2)‖v − c‖²``; far away it grows only logarithmically, so the
    envelope gradient ``∂_c D = λ(c − v)/(1 + ‖c − v‖²/δ²)`` is bounded by ``λδ/2`` — an outlier task whose
    solution sits far from the prior moves it little (Zhou et al. 2019, robustness experiment). The norm runs
    over *all* parameter entries of a task (one scalar per task). The penalty is not convex: for large
    ``‖v − c‖`` the inner problem may have several stationary points; the solver returns the one it reaches.
    """

    def __init__(self, lam: float, names: Sequence[str], scale: float = 1.0):
        self.names = list(names)
        self.lam = SquaredL2._check(lam, "lam")
        self.delta2 = SquaredL2._check(scale, "scale") ** 2
        self.lams = [self.lam] * len(self.names)

    @property
    def uniform(self) -> float | None:
        return None

    def _factor(self, diff: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.lam / (1.0 + _per_task_sqnorm(diff) / self.delta2)

    def value(self, v: Tensors, c: Tensors) -> torch.Tensor:
        sq = _per_task_sqnorm(torch._foreach_sub(v, c))
        return 0.5 * self.lam * self.delta2 * torch.log1p(sq / self.delta2)

    def grad_v(self, v: Tensors, c: Tensors) -> Tensors:
        diff = torch._foreach_sub(v, c)
        f = self._factor(diff)
        return [d * _task_view(f, d) for d in diff]

    def grad_c(self, v: Tensors, c: Tensors) -> Tensors:
        return [-g for g in self.grad_v(v, c)]
