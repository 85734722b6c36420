"""Reptile (Nichol, Achiam & Schulman 2018): move the prior toward the fine-tuned parameters.

Each task is fine-tuned from ``w`` by the shared inner solver with *no* penalty (``lam=None`` →
:class:`metaprox.prox.NoProx`): M steps of SGD with learning rate α on the task loss. The meta-gradient is the
displacement, normalised by the length of the inner trajectory,

    g = Σ_T a_T (w − v_T) / (α·M)

With one inner step, ``(w − v_T)/α = ∇L_T(w)`` exactly: Reptile reduces to joint training on the tasks; with
more steps it picks up the MAML-like term ``−α ∇²L ∇L`` (Nichol et al. 2018, §5). The outer step is the
optimizer's: plain SGD with lr β gives the paper's ``w ← w + ε (v̄ − w)`` with ``ε = β/(α·M)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metaprox.algorithms.base import MetaLearner
from metaprox.algorithms.fomaml import task_weighted_sum
from metaprox.solve import PerTask, SolvedGroup
from metaprox.tasks.task import Task

__all__ = ["Reptile"]

Tensors = list[torch.Tensor]


class Reptile(MetaLearner):
    """Reptile: ``g = Σ_T a_T (w − v_T)/(α·M)``, ``v_T`` = M inner steps of lr α from ``w`` (no prox term).

    Args:
        model, loss, inner, meta_optimizer, outer_lr, total_steps, schedule, execution, seed, inner_data:
            as in :class:`metaprox.MetaMinibatchProx`. ``inner`` must have a learning rate ``lr`` (α) and
            ``steps`` ≥ 1 (M): ``SGD`` (the paper's analysis) or ``Adam`` (its experiments).
        lam: ``None`` (default: Reptile has no penalty) or a prox weight for a proximal variant.

    Reptile needs no query set; ``inner_data="support+query"`` fine-tunes on every example of the task.

    Example:
        >>> import torch, metaprox
        >>> rep = metaprox.Reptile(metaprox.MLP([1, 40, 40, 1]), "mse", outer_lr=0.1)
        >>> x = torch.rand(10, 1)
        >>> diag = rep.step([metaprox.Task(x, torch.sin(x))])
        >>> diag["meta_grad_norm"] > 0
        True

    References: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999 (2018),
    Algorithm 2 (batched version) and §5 (one step = joint training).
    """

    rule_name = "reptile"

    def __init__(self, model: nn.Module, loss="mse", lam=None, inner=None, **kwargs):
        # few-step fine-tuning is not meant to reach a stationary point: no inexact-solve warning by default
        kwargs.setdefault("stationarity_warn_ratio", float("inf"))
        super().__init__(model, loss, lam=lam, inner=inner, **kwargs)
        lr = getattr(self.inner, "lr", None)
        if lr is None or int(self.inner.steps) < 1:
            raise ValueError(f"Reptile normalises w − v by α·M, so its inner solver needs a learning rate "
                             f"and steps ≥ 1; got {self.inner!r}. Use metaprox.SGD or metaprox.Adam.")
        self.scale = 1.0 / (float(lr) * int(self.inner.steps))

    def meta_gradient(self, tasks: Sequence[Task], solved: list[SolvedGroup],
                      weights: torch.Tensor) -> Tensors:
        # Σ_T a_T (c_T − v_T) = Σ a_T c_T − Σ a_T v_T (one center w: (Σ a_T)·w): linear in the weights, so
        # shards' partial sums add up
        w = self.center()
        sum_v = [torch.zeros_like(p) for p in w]
        sum_c = torch._foreach_mul(w, float(weights.sum()))
        for s in solved:
            torch._foreach_add_(sum_v, task_weighted_sum(weights[s.indices], s.result.params))
            if isinstance(s.center, PerTask):  # a task's own center (a tree's node)
                torch._foreach_add_(sum_c, torch._foreach_sub(task_weighted_sum(weights[s.indices], s.center),
                                                              torch._foreach_mul(w, float(weights[s.indices].sum()))))
        return list(torch._foreach_mul(torch._foreach_sub(sum_c, sum_v), self.scale))
