"""Batched conjugate gradient: exact after d steps on SPD systems, one independent recursion per task."""

from __future__ import annotations

import torch

from metaprox.linear_solve import conjugate_gradient, task_dot


def _spd(b: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(b, d, d, generator=g, dtype=torch.float64))[0]
    spread = torch.rand(b, 1, generator=g, dtype=torch.float64).add(1)
    eig = torch.logspace(-1, 1, d, dtype=torch.float64) * spread
    return q @ torch.diag_embed(eig) @ q.transpose(1, 2)


def test_exact_after_dimension_steps_on_a_stack_of_systems():
    a = _spd(3, 6)
    g = torch.Generator().manual_seed(1)
    rhs = [torch.randn(3, 4, generator=g, dtype=torch.float64),  # one vector split over two "parameters"
           torch.randn(3, 2, generator=g, dtype=torch.float64)]

    def matvec(p):
        y = (a @ torch.cat(p, 1).unsqueeze(2)).squeeze(2)
        return [y[:, :4], y[:, 4:]]

    truth = torch.linalg.solve(a, torch.cat(rhs, 1))
    errs = [float((torch.cat(conjugate_gradient(matvec, rhs, k), 1) - truth).norm()) for k in range(7)]
    assert all(bool((t == 0).all()) for t in conjugate_gradient(matvec, rhs, 0))  # zero steps: x₀ = 0
    assert errs[6] < 1e-10 * errs[0]
    assert errs[3] > 1e-6 * errs[0]  # not trivially converged earlier


def test_task_dot_and_non_positive_curvature_safeguard():
    v = [torch.ones(2, 3), torch.ones(2, 1)]
    torch.testing.assert_close(task_dot(v, v), torch.tensor([4.0, 4.0]))
    neg = conjugate_gradient(lambda p: [-t for t in p], [torch.ones(2, 3)], 5)  # A = −I: never step
    assert bool((neg[0] == 0).all())
