"""Inner solvers for the prox problem ``min_v L_T(v) + D(v, c)`` over functional parameters.

Every solver works on a stack of tasks (lists of tensors with a leading task axis), starts from a warm start
(the center, unless given), keeps no autograd graph across steps, and reports the stationarity
``‖∇L_T(v) + ∂_v D(v, c)‖`` of the answer it returns, so the theory's inexactness ε is visible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from metaprox.execution import Oracle
from metaprox.prox import Penalty, SquaredL2

__all__ = ["ProxProblem", "InnerResult", "InnerSolver", "SGD", "Adam", "AdamMoments", "ExactLeastSquares"]

Tensors = list[torch.Tensor]
Callback = Callable[[int, Tensors], None]


@dataclass
class AdamMoments:
    """Adam's first and second moment estimates (one tensor per parameter, no task axis) after ``t`` steps,
    carried from one inner problem to the next by ``Adam(carry_moments=True)``."""

    m: Tensors
    s: Tensors
    t: int


@dataclass
class ProxProblem:
    """The inner problem of a stack of tasks: data oracle, penalty and center (broadcast over tasks)."""

    oracle: Oracle
    prox: Penalty
    center: Tensors
    init: Tensors | None = None
    keys: torch.Tensor | None = None  # (B, steps, ≥ n) uniforms choosing inner minibatches (see MetaLearner.step)
    moments: AdamMoments | None = None  # where a moment-carrying solver starts (None: zeros at t = 0)

    def start(self) -> Tensors:
        """Warm start: a copy of ``init`` (or the center) for every task, with a leading task axis."""
        b = self.oracle.num_tasks
        src = self.center if self.init is None else self.init
        shapes = [p.shape for p in self.oracle.fmodel.params()]
        return [t.detach().expand(b, *s).clone() for t, s in zip(src, shapes, strict=True)]

    def stationarity(self, v: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """(data loss, ‖∇L(v) + ∂_v D(v, c)‖) per task, on each task's full data."""
        losses, g = self.oracle(v)
        self.prox.add_grad_v_(g, v, self.center)
        sq = cast(torch.Tensor, sum(t.square().flatten(1).sum(1) for t in g))  # ≥ 1 group: a tensor, not 0
        return losses, sq.sqrt()


@dataclass
class InnerResult:
    """Solutions ``params`` (leading task axis) and, when monitored, data loss and stationarity per task;
    ``moments``: a moment-carrying solver's final moments per task (leading task axis, ``t`` shared)."""

    params: Tensors
    loss: torch.Tensor | None = None
    stationarity: torch.Tensor | None = None
    moments: AdamMoments | None = None


class InnerSolver:
    """Base of inner solvers: a frozen dataclass with ``steps`` and a ``solve`` method."""

    steps: int

    def with_steps(self, steps: int) -> InnerSolver:
        if isinstance(steps, bool) or not float(steps).is_integer():  # 2.5 must not quietly become 2
            raise ValueError(f"steps = {steps!r}: the number of inner steps must be a whole number ≥ 0.")
        return replace(self, steps=int(steps))  # type: ignore[type-var]

    def solve(self, problem: ProxProblem, *, generator: torch.Generator | None = None, monitor: bool = True,
              callback: Callback | None = None) -> InnerResult:
        raise NotImplementedError

    def _finish(self, problem: ProxProblem, v: Tensors, monitor: bool) -> InnerResult:
        if not monitor:
            return InnerResult(v)
        loss, stat = problem.stationarity(v)
        return InnerResult(v, loss, stat)

    def _check(self) -> None:
        if isinstance(self.steps, bool) or not float(self.steps).is_integer() or int(self.steps) < 0:
            raise ValueError(f"{type(self).__name__}.steps = {self.steps!r}: must be a whole number ≥ 0.")
        lr = getattr(self, "lr", 1.0)
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}.lr = {lr}: the inner learning rate must be > 0.")
        bs = getattr(self, "batch_size", None)
        if bs is not None and int(bs) < 1:
            raise ValueError(f"{type(self).__name__}.batch_size = {bs}: must be ≥ 1 or None (full batch).")


def _minibatch(problem: ProxProblem, batch_size: int | None, gen: torch.Generator | None,
               step: int) -> torch.Tensor | None:
    """Indices (B, batch_size) of each task's examples for inner step ``step``, without replacement.

    Uses the problem's pre-drawn ``keys`` when given — drawn once per outer step for the whole minibatch, so the
    choice does not depend on how tasks are grouped or split across processes — else draws from ``gen``.
    """
    n = problem.oracle.num_examples
    if batch_size is None or batch_size >= n:
        return None
    b = problem.oracle.num_tasks
    if problem.keys is not None and step < problem.keys.shape[1]:
        keys = problem.keys[:, step, :n]
    else:
        keys = torch.rand(b, n, generator=gen)
    # argsort of uniforms: an independent draw without replacement per task, no Python loop over tasks
    return keys.argsort(dim=1)[:, :batch_size].to(problem.oracle.x.device)


@dataclass(frozen=True)
class SGD(InnerSolver):
    """Gradient descent on the prox objective: ``v ← v − lr·(∇L(v) + λ(v − c))`` (heavy-ball momentum optional).

    Args:
        lr: step size. steps: number of steps. momentum: heavy-ball coefficient (0 = plain SGD).
        nesterov: Nesterov momentum. batch_size: examples per step per task (None = the full support set).
    """

    lr: float = 0.02
    steps: int = 15
    momentum: float = 0.0
    nesterov: bool = False
    batch_size: int | None = None

    def solve(self, problem, *, generator=None, monitor=True, callback=None):
        self._check()
        v = problem.start()
        buf: Tensors | None = None
        if callback:
            callback(0, v)
        for k in range(self.steps):
            _, g = problem.oracle(v, _minibatch(problem, self.batch_size, generator, k))
            problem.prox.add_grad_v_(g, v, problem.center)
            if self.momentum:
                if buf is None:
                    buf = [t.clone() for t in g]
                else:
                    torch._foreach_mul_(buf, self.momentum)
                    torch._foreach_add_(buf, g)
                g = torch._foreach_add(g, buf, alpha=self.momentum) if self.nesterov else buf
            torch._foreach_add_(v, g, alpha=-self.lr)
            del g  # not alive during the next gradient: peak memory stays that of one step
            if callback:
                callback(k + 1, v)
        return self._finish(problem, v, monitor)


@dataclass(frozen=True)
class Adam(InnerSolver):
    """Adam on the prox objective (Kingma & Ba 2015).

    The paper's classification recipe uses ``beta1 = 0`` (RMSProp-like with bias correction).

    ``carry_moments=False`` (default): fresh moments for every inner problem. With ``beta1 = 0`` the first
    steps are then close to sign descent (``±lr`` per entry), whatever the gradient's scale.
    ``carry_moments=True``: the moments and the step count carry over from one inner problem to the next, as
    in the TensorFlow code of Reptile and of the MMP paper (one optimizer for all tasks; only the weights are
    reset to the prior). A meta-learner then starts every task from its running moments
    (``MetaLearner.inner_moments``) and, after each outer step, replaces them by the mean over the minibatch
    of the tasks' final moments (test-time adaptation reads them and leaves them unchanged). The step count
    advances by ``steps`` per outer step, as if the tasks had run side by side.
    """

    lr: float = 1e-3
    steps: int = 8
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: int | None = None
    carry_moments: bool = False

    def solve(self, problem, *, generator=None, monitor=True, callback=None):
        self._check()
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"Adam betas ({self.beta1}, {self.beta2}) must lie in [0, 1).")
        v = problem.start()
        start = problem.moments if self.carry_moments else None
        if start is None:
            m = [torch.zeros_like(t) for t in v]
            s = [torch.zeros_like(t) for t in v]
            t0 = 0
        else:
            m = [a.to(t.dtype).expand_as(t).clone() for a, t in zip(start.m, v, strict=True)]
            s = [a.to(t.dtype).expand_as(t).clone() for a, t in zip(start.s, v, strict=True)]
            t0 = int(start.t)
        if callback:
            callback(0, v)
        for k in range(t0 + 1, t0 + self.steps + 1):
            _, g = problem.oracle(v, _minibatch(problem, self.batch_size, generator, k - t0 - 1))
            problem.prox.add_grad_v_(g, v, problem.center)
            torch._foreach_lerp_(m, g, 1 - self.beta1)
            torch._foreach_mul_(s, self.beta2)
            torch._foreach_addcmul_(s, g, g, value=1 - self.beta2)
            bc1, bc2 = 1 - self.beta1 ** k, 1 - self.beta2 ** k
            denom = torch._foreach_sqrt(s)
            torch._foreach_div_(denom, bc2 ** 0.5)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(v, m, denom, value=-self.lr / bc1)
            del g, denom  # not alive during the next gradient: peak memory stays that of one step
            if callback:
                callback(k - t0, v)
        result = self._finish(problem, v, monitor)
        if self.carry_moments:
            result.moments = AdamMoments(m, s, t0 + self.steps)
        return result


def _linear_layout(module: nn.Module, names: list[str]) -> tuple[str, str | None]:
    """Names of (weight, bias) when the model is one Linear layer (possibly inside a Sequential)."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    others = [m for _, m in module.named_modules()
              if not isinstance(m, (nn.Linear, nn.Sequential, nn.Identity, nn.Flatten))]
    if len(linears) != 1 or others:
        raise ValueError("ExactLeastSquares needs a linear model (a single nn.Linear, optionally in a "
                         "Sequential) with loss 'mse'; use SGD or Adam for other models.")
    prefix = linears[0][0] + "." if linears[0][0] else ""
    w, b = prefix + "weight", (prefix + "bias" if linears[0][1].bias is not None else None)
    if set(names) != {w} | ({b} if b else set()):
        raise ValueError("ExactLeastSquares: all trainable parameters must belong to the single Linear layer.")
    return w, b


@dataclass(frozen=True)
class ExactLeastSquares(InnerSolver):
    """Closed-form prox solve for linear models with the ``mse`` loss (ridge regression toward the center).

    With L(θ) = (1/(n·o))·‖Xθ − Y‖² (θ stacks weight and bias, o outputs) and D = Σ_g λ_g/2 ‖θ_g − c_g‖²,
    the solution is ``θ* = (2/(n·o)·XᵀX + Λ)⁻¹ (2/(n·o)·XᵀY + Λ c)``, one solve per task. ``steps`` is ignored.
    A per-task penalty (:class:`metaprox.prox.TaskScaled`) gives each task its own Λ_t = s_t·Λ; the center may
    carry a leading task axis.
    """

    steps: int = 1

    def solve(self, problem, *, generator=None, monitor=True, callback=None):
        oracle = problem.oracle
        if oracle.loss.name != "mse":
            raise ValueError(f"ExactLeastSquares needs loss 'mse', got {oracle.loss.name!r}.")
        names = oracle.fmodel.names
        wname, bname = _linear_layout(oracle.fmodel.module, names)
        x, y = oracle.x, oracle.y
        if x.dim() != 3 or y.dim() != 3:
            raise ValueError("ExactLeastSquares needs inputs (n, features) and targets (n, outputs) per task.")
        bsz, n, d = x.shape
        o = y.shape[2]
        lam = dict(zip(names, problem.prox.lams, strict=True))
        center = dict(zip(names, problem.center, strict=True))
        xa = torch.cat([x, torch.ones(bsz, n, 1, dtype=x.dtype, device=x.device)], 2) if bname else x
        p = xa.shape[2]
        scale = 2.0 / (n * o)
        diag = torch.full((p,), lam[wname], dtype=x.dtype, device=x.device)
        c = center[wname].detach().expand(bsz, o, d).transpose(1, 2)  # (B, d, o): θ columns per output
        if bname:
            diag[d] = lam[bname]
            c = torch.cat([c, center[bname].detach().expand(bsz, o).unsqueeze(1)], 1)
        prox = problem.prox
        if not isinstance(getattr(prox, "base", prox), SquaredL2) or any(getattr(prox, "shared", ())):
            raise ValueError("ExactLeastSquares needs a squared-ℓ2 penalty with finite λ per group (no "
                             "'shared' groups, no robust penalty); use SGD or Adam.")
        task_scale = getattr(prox, "scale", None)  # TaskScaled: λ_{t,g} = s_t·λ_g (per-task pull)
        diag_b = diag.expand(bsz, p) if task_scale is None else task_scale.to(x).view(-1, 1) * diag
        a = scale * xa.transpose(1, 2) @ xa + torch.diag_embed(diag_b)
        rhs = scale * xa.transpose(1, 2) @ y + diag_b.unsqueeze(2) * c
        theta = torch.linalg.solve(a, rhs)  # (B, p, o)
        sol = {wname: theta[:, :d].transpose(1, 2).contiguous()}
        if bname:
            sol[bname] = theta[:, d].contiguous()
        v = [sol[nm] for nm in names]
        if callback:
            callback(1, v)
        return self._finish(problem, v, monitor)


SOLVERS: dict[str, type[InnerSolver]] = {"sgd": SGD, "adam": Adam, "exact_least_squares": ExactLeastSquares}
