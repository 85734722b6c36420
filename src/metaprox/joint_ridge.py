"""The exact joint optimum of a finite set of linear least-squares tasks pulled toward a learned center.

For linear models ``ŷ = W x + b`` (k outputs) and the mean-squared-error loss, the finite joint objective

    J(w, v_1..v_n) = Σ_t w_t [ L_t(v_t) + (s_t/2) Σ_e λ_e (v_te − w_e)² ],   L_t(v) = mean over n_t·k of (ŷ − y)²

is a quadratic. With the parameters of one task flattened (weight row-major, then bias: the layout of
:class:`~metaprox.store.ParamLayout` for ``nn.Linear``), ``L_t(v) = ½ vᵀH_t v − b_tᵀv + c_t`` with
``H_t = (2/(n_t k)) Σ_j E_jᵀ Z_tᵀZ_t E_j`` (``Z_t = [X_t, 1]``, ``E_j`` picking output j's weights and bias) and
``b_t = (2/(n_t k)) Σ_j E_jᵀ Z_tᵀ y_tj``. Setting the gradients to zero:

    v_t = A_t⁻¹ (b_t + s_t Λ w),  A_t = H_t + s_t Λ;
    [Σ_t w_t s_t (I − s_t A_t⁻¹ Λ)]_PP w_P = [Σ_t w_t s_t A_t⁻¹ b_t]_P

(P: the pulled entries, λ_e > 0; with w_t = s_t = 1 this is ``(I − mean_t A_t⁻¹Λ) w = mean_t A_t⁻¹ b_t``). The
reduced system has the size of one task's pulled parameters, so the optimum costs one batched solve of the n
small A_t and one |P|×|P| solve — seconds for 10⁴ tasks (``benchmarks/finite_exact_solve.py``), where
alternating exact updates (``finite.center_update = "exact"``) creep toward it. Private entries (λ_e = 0) are
free per task; the center's value there does not enter J. Shared entries (λ = ∞) are not covered here. With a
:class:`~metaprox.priors.Tree` prior the node centers solve one linear system of N·|P| unknowns
(:func:`solve_tree`).

:func:`solve_joint` returns the optimum; :func:`apply_to` writes it into a :class:`~metaprox.algorithms.finite.
FiniteMMP` (center and every task's row), which is ``finite.center_update = "solve"``; :func:`reduced_gap`
certifies a center: J(w) − J* after the v_t are re-solved, from the reduced gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["JointQuadratic", "JointSolution", "solve_joint", "solve_tree", "reduced_gap", "applies_to",
           "quadratic_of", "solve_learner", "apply_to"]

DT = torch.float64


@dataclass
class JointQuadratic:
    """Per-task ``H_t`` (n, P, P), ``b_t`` (n, P), ``c_t`` (n,), pull factors ``s`` (n,), weights ``w`` (n,) and
    the per-entry pull ``lam`` (P,) of the joint objective (see the module doc)."""

    H: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    s: torch.Tensor
    w: torch.Tensor
    lam: torch.Tensor

    @classmethod
    def of_tasks(cls, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], lam: torch.Tensor,
                 s: torch.Tensor | None = None, w: torch.Tensor | None = None) -> JointQuadratic:
        """From each task's inputs ``x`` (n_t, d) and targets ``y`` (n_t, k) (or (n_t,))."""
        n, d = len(xs), xs[0].shape[1]
        k = 1 if ys[0].dim() == 1 else ys[0].shape[1]
        P = k * (d + 1)
        if lam.numel() != P:
            raise ValueError(f"lam has {lam.numel()} entries, a linear model {d} → {k} has {P} parameters.")
        idx = [torch.cat([torch.arange(j * d, (j + 1) * d), torch.tensor([k * d + j])]) for j in range(k)]
        H = torch.zeros(n, P, P, dtype=DT)
        b = torch.zeros(n, P, dtype=DT)
        c = torch.zeros(n, dtype=DT)
        for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
            x, y = x.to(DT), y.to(DT).reshape(len(x), k)
            z = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
            scale = 2.0 / (len(x) * k)
            gram, zy = scale * (z.T @ z), scale * (z.T @ y)
            for j, ij in enumerate(idx):
                H[t, ij.unsqueeze(1), ij.unsqueeze(0)] = gram
                b[t, ij] = zy[:, j]
            c[t] = y.square().mean()
        ones = torch.ones(n, dtype=DT)
        return cls(H, b, c, ones if s is None else s.to(DT), ones if w is None else w.to(DT), lam.to(DT))

    @property
    def pulled(self) -> torch.Tensor:
        return self.lam > 0

    def task_rows(self, center: torch.Tensor) -> torch.Tensor:
        """Every task's minimiser v_t = A_t⁻¹ (b_t + s_t Λ c_t) for the center ``center`` (P,) or the
        per-task centers c_t (n, P)."""
        A = self.H + torch.diag_embed(self.s.unsqueeze(1) * self.lam)
        rhs = self.b + self.s.unsqueeze(1) * (self.lam * center)
        return torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)

    def objective(self, center: torch.Tensor, rows: torch.Tensor) -> float:
        """J at center (P,) or per-task centers (n, P) and rows (float64, from the quadratic form; without the
        tree terms)."""
        loss = 0.5 * torch.einsum("tp,tpq,tq->t", rows, self.H, rows) - (self.b * rows).sum(1) + self.c
        pen = 0.5 * self.s * ((rows - center).square() * self.lam).sum(1)
        return float((self.w * (loss + pen)).sum())


    def reduced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's term with v_t minimised out, as a quadratic in its center on the pulled entries:
        gradient ``Q_t c − r_t`` with ``Q_t = w_t s_t (Λ − s_t Λ A_t⁻¹ Λ)`` (n, |P|, |P|) and
        ``r_t = w_t s_t Λ A_t⁻¹ b_t`` (n, |P|)."""
        p = self.pulled
        A = self.H + torch.diag_embed(self.s.unsqueeze(1) * self.lam)
        lam_p = torch.diag(self.lam)[:, p]                                   # (P, |P|)
        Ainv_lam = torch.linalg.solve(A, lam_p.expand(len(A), *lam_p.shape))  # A_t⁻¹ Λ_{·P}
        Ainv_b = torch.linalg.solve(A, self.b.unsqueeze(-1)).squeeze(-1)
        ws = (self.w * self.s).view(-1, 1, 1)
        Q = ws * (torch.diag(self.lam[p]) - self.s.view(-1, 1, 1) * (lam_p.T @ Ainv_lam))
        r = ws.squeeze(-1) * (self.lam * Ainv_b)[:, p]
        return Q, r


@dataclass
class JointSolution:
    center: torch.Tensor     # (P,): the optimum on pulled entries; the given ``center`` elsewhere
    rows: torch.Tensor       # (n, P): every task's v_t
    objective: float         # J*
    theta: torch.Tensor | None = None  # (N, P): a Tree prior's node centers (``center`` is the root's)


def solve_joint(q: JointQuadratic, center: torch.Tensor | None = None) -> JointSolution:
    """The joint optimum by the reduced system of the module doc (``center`` fills the private entries)."""
    P = q.lam.numel()
    w0 = torch.zeros(P, dtype=DT) if center is None else center.to(DT).clone()
    A = q.H + torch.diag_embed(q.s.unsqueeze(1) * q.lam)
    Ainv_b = torch.linalg.solve(A, q.b.unsqueeze(-1)).squeeze(-1)
    p = q.pulled
    if bool(p.any()):
        Ainv_lam = torch.linalg.solve(A, torch.diag(q.lam).expand(len(A), P, P))  # A_t⁻¹Λ
        ws = (q.w * q.s).view(-1, 1, 1)
        M = (ws * (torch.eye(P, dtype=DT) - q.s.view(-1, 1, 1) * Ainv_lam)).sum(0)
        rhs = (ws.squeeze(-1) * Ainv_b).sum(0)
        # scale rows and columns by λ^½ so that M_PP becomes symmetric positive definite (better conditioned)
        root = q.lam[p].sqrt()
        Ms = root.unsqueeze(1) * M[p][:, p] / root.unsqueeze(0)
        w0[p] = torch.linalg.solve(Ms, root * rhs[p]) / root
    rows = q.task_rows(w0)
    return JointSolution(w0, rows, q.objective(w0, rows))


def solve_tree(q: JointQuadratic, tree: Any, theta: torch.Tensor) -> JointSolution:
    """The joint optimum with a :class:`~metaprox.priors.Tree` prior: J adds Σ_{n ≠ root} (m_n λ_n/2)‖θ_n −
    θ_parent‖² and task t is pulled toward its node's θ. With every v_t minimised out (:meth:`JointQuadratic.
    reduced`) the node centers solve one sparse linear system of N·|P| unknowns (dense here: for trees of up to
    a few hundred nodes). Private entries of θ are set to the root's (``theta``'s), where the tree terms vanish."""
    p = q.pulled
    N, m = len(tree.nodes), int(p.sum())
    node = torch.from_numpy(tree.task_node)
    theta = theta.to(DT).clone()
    theta[:] = theta[tree.index[tree.root]]
    if m:
        Q, r = q.reduced()
        K = torch.zeros(N, m, N, m, dtype=DT)
        diag = torch.zeros(N, m, m, dtype=DT).index_add_(0, node, Q)
        K[torch.arange(N), :, torch.arange(N), :] = diag
        R = torch.zeros(N, m, dtype=DT).index_add_(0, node, r)
        eye = torch.eye(m, dtype=DT)
        for name, parent in tree.parent.items():
            if parent is None:
                continue
            i, j = tree.index[name], tree.index[parent]
            k = float(tree.mass[i]) * tree.lam_up(name)
            K[i, :, i, :] += k * eye
            K[j, :, j, :] += k * eye
            K[i, :, j, :] -= k * eye
            K[j, :, i, :] -= k * eye
        theta[:, p] = torch.linalg.solve(K.reshape(N * m, N * m), R.reshape(-1)).view(N, m)
    centers = theta[node]
    rows = q.task_rows(centers)
    J = q.objective(centers, rows) + tree.penalty(theta)
    return JointSolution(theta[tree.index[tree.root]].clone(), rows, J, theta)


def reduced_gap(q: JointQuadratic, center: torch.Tensor) -> float:
    """J(center, v(center)) − J*: for the reduced quadratic F(w) = min_v J, ½ gᵀ H_F⁻¹ g with g = ∇F(center) =
    Σ_t w_t s_t Λ(w − v_t(w)) and H_F = Σ_t w_t s_t (Λ − s_t Λ A_t⁻¹ Λ) on the pulled entries."""
    p = q.pulled
    if not bool(p.any()):
        return 0.0
    rows = q.task_rows(center)
    ws = q.w * q.s
    g = (ws.unsqueeze(1) * q.lam * (center - rows)).sum(0)[p]
    A = q.H + torch.diag_embed(q.s.unsqueeze(1) * q.lam)
    lam_p = torch.diag(q.lam)[:, p]
    inner = lam_p.T @ torch.linalg.solve(A, lam_p.expand(len(A), *lam_p.shape))  # Λ A_t⁻¹ Λ on P
    HF = (ws.view(-1, 1, 1) * (torch.diag(q.lam[p]) - q.s.view(-1, 1, 1) * inner)).sum(0)
    return float(0.5 * g @ torch.linalg.solve(HF, g))


# ----- FiniteMMP adapter (finite.center_update = "solve") --------------------------------------------------------
def applies_to(learner: Any) -> str | None:
    """None if the joint optimum of ``learner`` has the closed form here, else why not."""
    module = learner.fmodel.module
    if not isinstance(module, torch.nn.Linear):
        return f"the model is {type(module).__name__}, not one linear layer"
    if learner.loss.name != "mse":
        return f"the loss is {learner.loss.name}, not mean squared error"
    if learner.any_shared or learner.graph is not None:
        return "shared groups or a graph coupling are not covered"
    if not hasattr(learner.prox, "lams"):
        return "the penalty is not a squared-ℓ2 pull"
    return None


def quadratic_of(learner: Any) -> JointQuadratic:
    """The :class:`JointQuadratic` of a FiniteMMP's task set, pulls and weights."""
    why = applies_to(learner)
    if why is not None:
        raise ValueError(f"no closed-form joint optimum: {why}.")
    ts = learner.tasks
    return JointQuadratic.of_tasks([t.x for t in ts.tasks], [t.y for t in ts.tasks], learner.lam_entries.to(DT),
                                   learner.task_scale.to(DT), ts.weights.to(DT))


def solve_learner(learner: Any) -> JointSolution:
    """The joint optimum of a FiniteMMP's problem (flat, or with its Tree prior)."""
    q = quadratic_of(learner)
    if learner.prior is not None:
        return solve_tree(q, learner.prior, learner.theta)
    return solve_joint(q, learner.w_row().to(DT))


def apply_to(learner: Any, owned: tuple[int, int] | None = None) -> JointSolution:
    """Solve the learner's joint problem and write the optimum: the center (and a tree's node centers) into the
    learner, the v_t of tasks ``owned`` = [lo, hi) (default: all) into the store (at the store's precision)."""
    sol = solve_learner(learner)
    if sol.theta is not None:
        learner.theta = sol.theta.to(learner.dtype)
    with torch.no_grad():
        for p, t in zip(learner.fmodel.params(), learner.layout.unflatten(sol.center.unsqueeze(0)), strict=True):
            p.copy_(t[0].to(p.dtype))
    lo, hi = owned or (0, len(learner.tasks))
    for start in range(lo, hi, 4096):
        ids = np.arange(start, min(hi, start + 4096))
        learner.store.write(ids, sol.rows[ids].to(learner.dtype))
    return sol
