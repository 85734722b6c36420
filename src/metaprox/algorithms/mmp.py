"""Meta-MinibatchProx (Zhou, Yuan, Xu, Yan & Feng, NeurIPS 2019): the meta-gradient λ(w − v̄).

For each task the inner solver returns v_T ≈ argmin_v L_T(v) + (λ/2)‖v − w‖². By Lemma 1 the gradient of the
Moreau envelope φ_T(w) is λ(w − v_T*), so the meta-gradient of a (weighted) minibatch is

    g = Σ_T a_T ∂_w D(v_T, w) = λ (w − Σ_T a_T v_T)        (squared ℓ2 penalty)

— first order, no Hessian, no unrolling. With the default outer optimizer (SGD, lr α, linear decay) the update
is the paper's ``w ← w − η_s·λ·(w − v̄)``, ``η_s = α(1 − s/S)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaprox.algorithms.base import MetaLearner
from metaprox.solve import SolvedGroup
from metaprox.tasks.task import Task

__all__ = ["MetaMinibatchProx", "envelope_gradient"]


def envelope_gradient(solved: list[SolvedGroup], weights: torch.Tensor) -> list[torch.Tensor]:
    """Σ_T a_T ∂_c D_T(v_T, c_T): the weighted Moreau-envelope gradient (Lemma 1) at the centers the tasks were
    solved with, for any penalty D (each group's own, e.g. with per-task pulls)."""
    total: list[torch.Tensor] = []
    for s in solved:
        assert s.penalty is not None and s.center is not None
        g = s.penalty.grad_c(s.result.params, s.center)
        a = weights[s.indices].to(g[0].dtype).to(g[0].device)
        part = [torch.tensordot(a, t, dims=1) for t in g]
        total = part if not total else list(torch._foreach_add(total, part))
    return total


class MetaMinibatchProx(MetaLearner):
    """Meta-MinibatchProx: learn a prior w whose prox-neighbourhood fits every task.

    Args:
        model: any ``nn.Module``; its trainable parameters are the meta-parameters w.
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``(pred, y) -> scalar``.
        lam: prox weight λ > 0, or ``{glob: λ}`` per parameter group. The penalty is (λ/2)·Σ over all entries.
        inner: inner solver (``metaprox.SGD``, ``metaprox.Adam``, ``metaprox.ExactLeastSquares``).
        meta_optimizer: a ``torch.optim`` optimizer over ``model.parameters()`` (or a factory ``params ->
            optimizer``); default SGD with lr ``outer_lr`` — the paper's outer rule.
        outer_lr: α of the default optimizer. total_steps: S for the linear decay η_s = α(1 − s/S).
        schedule: ``"linear"`` (default, needs total_steps) or ``"constant"``; applied to any optimizer.
        execution: ``"auto"``, ``"batched"``, ``"vmap"`` or ``"loop"`` (results agree up to round-off).
        seed: seed of the generator used for inner minibatches.
        inner_data: ``"support"`` (default) or ``"support+query"``: the paper has one data set per task,
            used by the inner and the outer step alike; with tasks split into support and query sets, the
            union is that data set. (Adaptation at test time, :meth:`adapt`, always uses the support set.)

    Example:
        >>> import torch, metaprox
        >>> model = metaprox.MLP([1, 40, 40, 1])
        >>> mmp = metaprox.MetaMinibatchProx(model, "mse", lam=0.5, inner=metaprox.SGD(lr=0.02, steps=15),
        ...                                  outer_lr=0.8, total_steps=100)
        >>> x = torch.rand(10, 1) * 10 - 5
        >>> diag = mmp.step([metaprox.Task(x, torch.sin(x))])
        >>> sorted(diag)[:3]
        ['inner_loss', 'inner_stationarity', 'lr']

    References: Zhou et al., "Efficient Meta Learning via Minibatch Proximal Update", NeurIPS 2019, Alg. 1.
    """

    rule_name = "mmp"

    def meta_gradient(self, tasks: Sequence[Task], solved: list[SolvedGroup],
                      weights: torch.Tensor) -> list[torch.Tensor]:
        return envelope_gradient(solved, weights) or [torch.zeros_like(p) for p in self.center()]
