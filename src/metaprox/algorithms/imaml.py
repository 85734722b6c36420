"""Implicit MAML (iMAML, Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019): the implicit meta-gradient.

The inner problem is MMP's prox problem on the support set, ``v_T = argmin_v L_T^s(v) + (λ/2)‖v − w‖²``
(the same shared solve). At its exact solution the stationarity ``∇L_T^s(v) + λ(v − w) = 0`` gives, by the
implicit function theorem, ``∂v_T/∂w = λ (H + λI)⁻¹`` with ``H = ∇²L_T^s(v_T)``, hence (Rajeswaran et al.,
Lemma 1, eq. 6)

    g_T = (∂v_T/∂w)ᵀ ∇L_T^query(v_T) = (I + H/λ)⁻¹ ∇L_T^query(v_T)

With per-group weights Λ = diag(λ_g) the same argument gives ``g_T = Λ (H + Λ)⁻¹ ∇L^query``; we solve the
symmetric system ``(H + Λ) y = ∇L^query`` by ``cg_steps`` of conjugate gradient (Hessian-vector products,
batched over tasks) and return ``Λ y`` — for a uniform λ exactly the CG iterates of the paper's
``(I + H/λ)`` system. No unrolling: memory does not depend on the number of inner steps. The answer is exact
only at an exact inner solution and with enough CG steps (≥ the parameter count, in exact arithmetic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from metaprox.algorithms.base import MetaLearner
from metaprox.algorithms.fomaml import query_gradient, task_weighted_sum
from metaprox.execution import Oracle
from metaprox.linear_solve import conjugate_gradient
from metaprox.prox import NoProx
from metaprox.solve import SolvedGroup
from metaprox.tasks.task import Task

__all__ = ["IMAML", "hessian_vector_product"]

Tensors = list[torch.Tensor]


def _fill(gs: Sequence[torch.Tensor | None], like: Tensors) -> Tensors:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, like, strict=True)]


def hessian_vector_product(oracle: Oracle, v: Tensors) -> Callable[[Tensors], Tensors]:
    """``p ↦ ∇²L_b(v_b) p_b`` for every task b of the oracle's stack (full data), by its execution strategy.

    ``batched``/``loop``: double backward through one retained gradient graph (built once, reused by every CG
    step); ``vmap``: ``torch.func.jvp`` of ``torch.func.grad``, vmapped over tasks.
    """
    fm, loss, x, y = oracle.fmodel, oracle.loss, oracle.x, oracle.y
    if oracle.strategy == "vmap":
        def task_grad(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> dict:
            return grad(lambda q: loss.single(fm.single(q, xb), yb))(params)

        def hvp_one(params: dict, tangent: dict, xb: torch.Tensor, yb: torch.Tensor) -> dict:
            return jvp(lambda q: task_grad(q, xb, yb), (params,), (tangent,))[1]

        vh = vmap(hvp_one)
        primal = dict(zip(fm.names, [t.detach() for t in v], strict=True))
        return lambda p: [vh(primal, dict(zip(fm.names, p, strict=True)), x, y)[n] for n in fm.names]

    if oracle.strategy == "batched":
        vs = [t.detach().requires_grad_(True) for t in v]
        with torch.enable_grad():
            total = loss.batched(fm.run_batched(dict(zip(fm.names, vs, strict=True)), x), y).sum()
            g = torch.autograd.grad(total, vs, create_graph=True)

        def hvp(p: Tensors) -> Tensors:  # tasks are independent: the Hessian of the sum is block diagonal
            return _fill(torch.autograd.grad(g, vs, grad_outputs=p, retain_graph=True, allow_unused=True), vs)
        return hvp

    per_task = []
    for b in range(oracle.num_tasks):
        vs = [t[b].detach().requires_grad_(True) for t in v]
        with torch.enable_grad():
            g = torch.autograd.grad(loss.single(fm.single(vs, x[b]), y[b]), vs, create_graph=True)
        per_task.append((vs, g))

    def hvp_loop(p: Tensors) -> Tensors:
        out = [_fill(torch.autograd.grad(g, vs, grad_outputs=[t[b] for t in p], retain_graph=True,
                                         allow_unused=True), vs) for b, (vs, g) in enumerate(per_task)]
        return [torch.stack(ts) for ts in zip(*out, strict=True)]
    return hvp_loop


class IMAML(MetaLearner):
    """Implicit MAML: ``g = Σ_T a_T (I + ∇²L_T^s(v_T)/λ)⁻¹ ∇L_T^query(v_T)``, the inverse applied by CG.

    Args:
        model, loss, inner, meta_optimizer, outer_lr, total_steps, schedule, execution, seed: as in
            :class:`metaprox.MetaMinibatchProx` (the inner solve is MMP's, on the support set).
        lam: prox weight λ > 0 (or ``{glob: λ}``); required — iMAML's meta-gradient is defined by the prox.
        cg_steps: conjugate-gradient iterations per outer step (the paper uses 5); each costs one batched
            Hessian-vector product.

    Every task needs a query set (``Task(x, y, x_query, y_query)``).

    Example:
        >>> import torch, metaprox
        >>> im = metaprox.IMAML(metaprox.MLP([1, 40, 40, 1]), "mse", lam=1.0, cg_steps=5, outer_lr=0.01)
        >>> x, xq = torch.rand(10, 1), torch.rand(10, 1)
        >>> diag = im.step([metaprox.Task(x, torch.sin(x), xq, torch.sin(xq))])
        >>> diag["meta_grad_norm"] > 0
        True

    References: Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019,
    Lemma 1 and Algorithm 2. Known deviation: the paper's inner solve is approximate too (Theorem 1 bounds the
    error); we report its stationarity in the diagnostics instead of bounding it.
    """

    rule_name = "imaml"

    needs_query = True

    def __init__(self, model: nn.Module, loss="mse", lam=1.0, inner=None, cg_steps: int = 5, **kwargs):
        super().__init__(model, loss, lam=lam, inner=inner, **kwargs)
        if isinstance(self.prox, NoProx):
            raise ValueError("IMAML needs a prox weight λ > 0: its implicit gradient (I + H/λ)⁻¹ is "
                             "defined by the prox term (use Reptile/FOMAML/MAML for a penalty-free inner "
                             "loop).")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"cg_steps = {cg_steps!r}: must be an integer ≥ 1.")
        self.cg_steps = cg_steps

    def meta_gradient(self, tasks: Sequence[Task], solved: list[SolvedGroup],
                      weights: torch.Tensor) -> Tensors:
        lams = self.prox.lams
        total = [torch.zeros_like(p) for p in self.center()]
        for s in solved:
            v = s.result.params
            _, gq = query_gradient(self, tasks, s)
            hvp = hessian_vector_product(s.oracle, v)

            def matvec(p: Tensors, hvp=hvp) -> Tensors:  # (H + Λ) p, symmetric
                return [hp + lam * pi for hp, pi, lam in zip(hvp(p), p, lams, strict=True)]

            y = conjugate_gradient(matvec, gq, self.cg_steps)
            torch._foreach_add_(total, task_weighted_sum(weights[s.indices], torch._foreach_mul(y, lams)))
        return total
