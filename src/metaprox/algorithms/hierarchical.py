"""`HierarchicalMMP`: Meta-MinibatchProx with a two-level prior in the infinite-task setting.

Tasks come from named groups (e.g. Omniglot alphabets). Task t of group g is pulled toward the group center
θ_g with λ; every group center is pulled toward the root w (the model's parameters) with λ_group:

    min_{w, θ}  E_g [ E_{t∈g} φ_t(θ_g) + (λ_group/2)‖θ_g − w‖² ],   φ_t(θ) = min_v L_t(v) + (λ/2)‖v − θ‖².

One outer step on a minibatch of (task, group) pairs: solve each task's prox problem at its group's center
(batched by shape, the center carries a leading task axis), then take envelope-gradient steps (Lemma 1 at
both levels): θ_g ← θ_g − η[Σ_{t∈g} â_t λ(θ_g − v_t) + â_g λ_group(θ_g − w)], and w through the optimizer
with gradient Σ_g â_g λ_group(w − θ_g) (â_g = Σ_{t∈g} â_t). A group seen for the first time starts at w.

Adaptation: a task of a known group is solved from θ_g with λ; a task of an unknown group from w with the
*marginal* pull λ·λ_group/(λ + λ_group) — the exact infimal convolution of the two quadratic pulls, i.e. the
unknown group center integrated out. Needs a squared-ℓ2 penalty with one λ (``lam`` a number).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaprox.algorithms.base import MetaLearner, NonFiniteError
from metaprox.prox import TaskScaled, make_prox
from metaprox.solvers import InnerSolver, ProxProblem
from metaprox.tasks.task import Task

__all__ = ["HierarchicalMMP"]

Tensors = list[torch.Tensor]


class HierarchicalMMP(MetaLearner):
    """Two-level MMP: tasks → group centers θ_g → root w. ``lam_group`` is the group-to-root pull; other
    arguments as in :class:`metaprox.MetaMinibatchProx` (``lam`` must be a single number).
    ``group_lr`` is the step size of the group centers (default: the optimizer's base learning rate)."""

    supports_carried_moments = False  # its own step(): the running moments would never be updated

    def __init__(self, model, loss="mse", lam: float = 1.0, lam_group: float = 1.0, group_lr: float | None = None,
                 **kwargs):
        super().__init__(model, loss, lam, **kwargs)
        if self.prox.uniform is None:
            raise ValueError("HierarchicalMMP needs one λ for all parameters (lam a number).")
        if not lam_group > 0:
            raise ValueError(f"lam_group = {lam_group} must be > 0.")
        self.lam_group = float(lam_group)
        self.group_lr = group_lr
        self.groups: dict[str, Tensors] = {}

    def group_center(self, group: str) -> Tensors:
        if group not in self.groups:
            self.groups[group] = [p.detach().clone() for p in self.fmodel.params()]
        return self.groups[group]

    def step(self, tasks: Sequence[Task], groups: Sequence[str],  # type: ignore[override]
             monitor: bool = True) -> dict[str, float]:
        """One outer step on ``tasks`` with their group names ``groups``."""
        if len(tasks) != len(groups) or not tasks:
            raise ValueError("give one group name per task (and at least one task).")
        lam, a = float(self.prox.uniform), 1.0 / len(tasks)  # type: ignore[arg-type]
        w = self.center()
        centers = [self.group_center(g) for g in groups]
        grads: dict[str, Tensors] = {g: [torch.zeros_like(t) for t in w] for g in set(groups)}
        mass = {g: a * list(groups).count(g) for g in set(groups)}
        stat = 0.0
        for idx in self.execution.groups(tasks):
            x, y = self.execution.stack([tasks[i] for i in idx])
            c = [torch.stack([centers[i][k] for i in idx]) for k in range(len(w))]
            res = self.inner.solve(ProxProblem(self.execution.oracle(x, y), self.prox, c),
                                   generator=self.generator, monitor=monitor)
            if monitor and res.stationarity is not None:
                stat += float(res.stationarity.sum())
            for j, i in enumerate(idx):
                for acc, cj, vj in zip(grads[groups[i]], c, res.params):
                    acc.add_(a * lam * (cj[j] - vj[j]))
        root_grad = [torch.zeros_like(t) for t in w]
        for g, gg in grads.items():
            for acc, r, th, wk in zip(gg, root_grad, self.groups[g], w):
                acc.add_(mass[g] * self.lam_group * (th - wk))
                r.add_(mass[g] * self.lam_group * (wk - th))
        gnorm = sum(float(t.double().square().sum()) for t in root_grad) ** 0.5
        if gnorm != gnorm or gnorm == float("inf"):
            raise NonFiniteError(f"non-finite meta-gradient at outer step {self.step_count}.")
        factor = self.lr_factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor
        eta = (self.group_lr if self.group_lr is not None else self._base_lrs[0]) * factor
        for g, gg in grads.items():
            torch._foreach_add_(self.groups[g], gg, alpha=-eta)
        for p, gk in zip(self.fmodel.params(), root_grad):
            p.grad = gk.to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        out = {"step": float(self.step_count), "lr": self.optimizer.param_groups[0]["lr"], "meta_grad_norm": gnorm,
               "groups": float(len(self.groups))}
        if monitor:
            out["inner_stationarity"] = stat / len(tasks)
        return out

    def adapt(self, task: Task, group: str | None = None, steps: int | None = None,  # type: ignore[override]
              inner: InnerSolver | None = None) -> dict[str, torch.Tensor]:
        """Parameters for ``task``: from its group's center if the group is known, else from the root with the
        marginal pull λλ_group/(λ + λ_group)."""
        solver = inner or self.inner
        if steps is not None:
            solver = solver.with_steps(steps)
        lam = float(self.prox.uniform)  # type: ignore[arg-type]
        if group is not None and group in self.groups:
            center, prox = self.groups[group], self.prox
        else:
            center = self.center()
            prox = TaskScaled(make_prox(lam, self.names), torch.tensor([self.lam_group / (lam + self.lam_group)]))
        x, y = self.execution.stack([task])
        res = solver.solve(ProxProblem(self.execution.oracle(x, y), prox, [c.unsqueeze(0) for c in center]),
                           generator=self.generator, monitor=False)
        return {n: t[0] for n, t in zip(self.names, res.params)}
