"""First-order MAML (FOMAML): the query-loss gradient at the adapted parameters.

For every task the shared inner solver adapts the prior on the support set,
``v_T ≈ argmin_v L_T^support(v)`` (plain risk minimisation started at ``w``; a prox term ``D(v, w)`` only if
``lam`` is given), and the meta-gradient of a weighted minibatch is

    g = Σ_T a_T ∇L_T^query(v_T)

i.e. MAML's gradient with the Jacobian ∂v_T/∂w replaced by the identity (Finn, Abbeel & Levine,
"Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017, §5.2; Nichol et al. 2018,
§3). First order: no graph crosses inner steps, so memory does not depend on their number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metaprox.algorithms.base import MetaLearner
from metaprox.solve import SolvedGroup
from metaprox.tasks.task import Task

__all__ = ["FOMAML", "query_gradient", "task_weighted_sum"]

Tensors = list[torch.Tensor]


def query_gradient(learner: MetaLearner, tasks: Sequence[Task], solved: SolvedGroup,
                   params: Tensors | None = None) -> tuple[torch.Tensor, Tensors]:
    """Query losses ``(B,)`` and per-task query gradients (leading task axis) of one solved group.

    Evaluated at ``params`` (default: the group's inner solutions), with the learner's execution strategy.
    """
    group = [tasks[i] for i in solved.indices]
    xq, yq = learner.execution.stack(group, query=True)
    oracle = learner.execution.oracle(xq, yq)
    return oracle(solved.result.params if params is None else params)


def task_weighted_sum(weights: torch.Tensor, per_task: Sequence[torch.Tensor]) -> Tensors:
    """``Σ_b a_b t[b]`` for every tensor ``t`` of ``per_task`` (leading task axis)."""
    a = weights.to(per_task[0].dtype).to(per_task[0].device)
    return [torch.tensordot(a, t, dims=1) for t in per_task]


class FOMAML(MetaLearner):
    """First-order MAML: ``g = Σ_T a_T ∇L_T^query(v_T)``, ``v_T`` the shared inner solve on the support set.

    Args:
        model, loss, inner, meta_optimizer, outer_lr, total_steps, schedule, execution, seed: as in
            :class:`metaprox.MetaMinibatchProx`. The default inner solver is ``SGD(lr=0.02, steps=15)``.
        lam: ``None`` (default, standard FOMAML: no penalty, the inner loop is plain fine-tuning from ``w``)
            or a prox weight, which turns the inner problem into MMP's ``L_T(v) + (λ/2)‖v − w‖²``.

    Every task needs a query set (``Task(x, y, x_query, y_query)``); the inner solve uses the support set.

    Example:
        >>> import torch, metaprox
        >>> fo = metaprox.FOMAML(metaprox.MLP([1, 40, 40, 1]), "mse", outer_lr=0.01)
        >>> x, xq = torch.rand(10, 1), torch.rand(10, 1)
        >>> diag = fo.step([metaprox.Task(x, torch.sin(x), xq, torch.sin(xq))])
        >>> diag["meta_grad_norm"] > 0
        True

    References: Finn et al., ICML 2017, §5.2 (first-order approximation); Nichol, Achiam & Schulman, "On
    First-Order Meta-Learning Algorithms", arXiv:1803.02999 (2018), §3.
    """

    rule_name = "fomaml"

    needs_query = True

    def __init__(self, model: nn.Module, loss="mse", lam=None, inner=None, **kwargs):
        # few-step fine-tuning is not meant to reach a stationary point: no inexact-solve warning by default
        kwargs.setdefault("stationarity_warn_ratio", float("inf"))
        super().__init__(model, loss, lam=lam, inner=inner, **kwargs)

    def meta_gradient(self, tasks: Sequence[Task], solved: list[SolvedGroup],
                      weights: torch.Tensor) -> Tensors:
        total = [torch.zeros_like(p) for p in self.center()]
        for s in solved:
            _, g = query_gradient(self, tasks, s)
            torch._foreach_add_(total, task_weighted_sum(weights[s.indices], g))
        return total
