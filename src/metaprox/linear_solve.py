"""Batched linear solves ``A_b x_b = r_b`` for a stack of tasks, matrix-free (``matvec`` only).

Vectors are lists of tensors with a leading task axis (one parameter set per task); every task runs its own
conjugate-gradient recursion (its own step sizes), all tasks advance together in one ``matvec`` call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["task_dot", "conjugate_gradient"]

Tensors = list[torch.Tensor]
MatVec = Callable[[Tensors], Tensors]


def task_dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """Per-task inner product ``⟨a_b, b_b⟩`` over all parameter entries, shape ``(B,)``."""
    return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _axpy_(y: Tensors, alpha: torch.Tensor, x: Tensors) -> None:
    """y += alpha[b]·x, with a per-task scalar alpha (B,)."""
    for yi, xi in zip(y, x, strict=True):
        yi.add_(alpha.view(-1, *([1] * (xi.dim() - 1))) * xi)


def conjugate_gradient(matvec: MatVec, b: Tensors, steps: int) -> Tensors:
    """``steps`` iterations of conjugate gradient (Hestenes & Stiefel 1952) for ``A x = b`` from ``x₀ = 0``.

    ``A`` must be symmetric; on a positive definite ``A`` of dimension d, CG is exact after d steps (in exact
    arithmetic). A task whose search direction has ``pᵀAp ≤ 0`` (non-positive curvature, or a residual that is
    already exactly zero) stops moving instead of diverging — the usual truncated-CG safeguard.

    Args:
        matvec: ``p ↦ A p`` on stacked vectors (leading task axis), one independent ``A_b`` per task.
        b: right-hand sides, stacked. steps: number of CG iterations (0 returns zeros).

    Returns:
        The iterate ``x_steps`` (same layout as ``b``).
    """
    if int(steps) < 0:
        raise ValueError(f"conjugate_gradient: steps = {steps} must be ≥ 0.")
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = task_dot(r, r)
    for _ in range(int(steps)):
        ap = matvec(p)
        pap = task_dot(p, ap)
        ok = pap > 0
        alpha = torch.where(ok, rr / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        _axpy_(x, alpha, p)
        _axpy_(r, -alpha, ap)
        rr_new = task_dot(r, r)
        live = rr > 0
        beta = torch.where(live, rr_new / torch.where(live, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = [ri + beta.view(-1, *([1] * (ri.dim() - 1))) * pi for ri, pi in zip(r, p, strict=True)]
        rr = rr_new
    return x
