"""New penalties: per-group shared/private λ, per-task λ factors, robust prox — against autograd and closed forms;
the old SquaredL2 behaviour is unchanged."""

from __future__ import annotations

import math

import pytest
import torch

import metaprox
from metaprox.prox import PRIVATE, SHARED, GroupL2, Penalty, RobustL2, SquaredL2, TaskScaled, make_prox

DT = torch.float64


def vc(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(b, 2, 3, generator=g, dtype=DT), torch.randn(b, 2, generator=g, dtype=DT)]
    c = [torch.randn(2, 3, generator=g, dtype=DT), torch.randn(2, generator=g, dtype=DT)]
    return v, c


def autograd_grads(pen, v, c):
    v = [t.clone().requires_grad_(True) for t in v]
    c = [t.clone().requires_grad_(True) for t in c]
    gv = torch.autograd.grad(pen.value(v, c).sum(), v, retain_graph=True)
    gc = torch.autograd.grad(pen.value(v, c).sum(), c)
    return gv, gc


@pytest.mark.parametrize("make", [
    lambda n: SquaredL2({"w": 2.0, "*": 0.5}, n),
    lambda n: GroupL2({"w": 2.0, "b": "private"}, n),
    lambda n: TaskScaled(SquaredL2(1.5, n), torch.tensor([0.5, 1.0, 3.0])),
    lambda n: RobustL2(0.7, n),
    lambda n: RobustL2(0.7, n, scale=2.0),
    lambda n: TaskScaled(RobustL2(2.0, n), torch.tensor([1.0, 0.0, 2.0])),
])
def test_penalty_gradients_match_autograd(make):
    pen = make(["w", "b"])
    v, c = vc()
    gv, gc = autograd_grads(pen, v, c)
    assert all(torch.allclose(a, b) for a, b in zip(pen.grad_v(v, c), gv, strict=True))
    # grad_c is per task (no sum over the task axis)
    assert all(torch.allclose(a.sum(0), b) for a, b in zip(pen.grad_c(v, c), gc, strict=True))
    g = [torch.zeros_like(t) for t in v]
    pen.add_grad_v_(g, v, c)
    assert all(torch.allclose(a, b) for a, b in zip(g, gv, strict=True))


def test_robust_envelope_gradient_is_paper_formula():
    v, c = vc(b=1)
    sq = sum(float((a - b).square().sum()) for a, b in zip(v, c, strict=True))
    pen = RobustL2(3.0, ["w", "b"])
    assert float(pen.value(v, c)) == pytest.approx(1.5 * math.log1p(sq))
    for g, a, b in zip(pen.grad_c(v, c), v, c, strict=True):
        assert torch.allclose(g[0], 3.0 * (b - a[0]) / (1 + sq))
    # bounded: ‖∂_c D‖ ≤ λ/2 however far the task is
    far = [t * 1e4 for t in v]
    norm = math.sqrt(sum(float(t.square().sum()) for t in pen.grad_c(far, c)))
    assert norm <= 1.5 + 1e-9


def test_group_l2_named_cases_and_limits():
    pen = GroupL2({"w": "shared", "b": "private"}, ["w", "b"])
    assert pen.group_lams == [SHARED, PRIVATE] and pen.shared == [True, False] and pen.any_shared
    v, c = vc()
    assert torch.equal(pen.value(v, c), torch.zeros(3, dtype=DT))  # shared: the constraint; private: no pull
    g = [torch.ones_like(t) for t in v]
    pen.mask_shared_(g)
    assert float(g[0].abs().sum()) == 0 and float(g[1].sum()) == g[1].numel()
    assert GroupL2(2.0, ["w"]).uniform == 2.0 and pen.uniform is None


def test_task_scaled_equals_per_task_penalties():
    v, c = vc()
    s = torch.tensor([0.5, 1.0, 3.0], dtype=DT)
    pen = TaskScaled(SquaredL2(1.5, ["w", "b"]), s)
    for t in range(3):
        one = SquaredL2(1.5 * float(s[t]), ["w", "b"])
        vt = [x[t:t + 1] for x in v]
        assert torch.allclose(pen.value(v, c)[t], one.value(vt, c)[0])
    nested = TaskScaled(pen, s)
    assert torch.allclose(nested.scale, s * s) and isinstance(nested.base, SquaredL2)
    with pytest.raises(ValueError):
        TaskScaled(pen, torch.tensor([1.0, -1.0, 1.0]))


def test_make_prox_accepts_new_penalties_and_old_behaviour_is_unchanged():
    r = RobustL2(1.0, ["w"])
    assert make_prox(r, ["w"]) is r and isinstance(r, Penalty)
    with pytest.raises(ValueError, match="other parameter names"):
        make_prox(r, ["x"])
    with pytest.raises(ValueError):
        SquaredL2(0.0, ["w"])  # plain SquaredL2 still refuses λ = 0
    assert isinstance(make_prox(None, ["w"]), metaprox.NoProx)


def test_exact_least_squares_per_task_lambda_and_leading_center():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 1).to(DT)
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=1.0, inner=metaprox.ExactLeastSquares())
    x = torch.randn(2, 10, 3, generator=g, dtype=DT)
    y = torch.randn(2, 10, 1, generator=g, dtype=DT)
    oracle = mmp.execution.oracle(x, y)
    s = torch.tensor([0.3, 4.0], dtype=DT)
    center = [torch.randn(2, 1, 3, generator=g, dtype=DT), torch.randn(2, 1, generator=g, dtype=DT)]
    prob = metaprox.ProxProblem(oracle, TaskScaled(mmp.prox, s), center)
    res = metaprox.ExactLeastSquares().solve(prob)
    assert float(res.stationarity.max()) < 1e-10
    with pytest.raises(ValueError, match="shared"):
        metaprox.ExactLeastSquares().solve(metaprox.ProxProblem(oracle, GroupL2("shared", mmp.names), center))


def test_robust_prox_in_infinite_mmp():
    """MMP (infinite setting) takes the robust penalty as its prox: the meta-gradient is the bounded formula."""
    model = torch.nn.Linear(1, 1).to(DT)
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=RobustL2(1.0, ["weight", "bias"]),
                                     inner=metaprox.SGD(lr=0.1, steps=50))
    x = torch.linspace(-1, 1, 8, dtype=DT).view(-1, 1)
    diag = mmp.step([metaprox.Task(x, 3 * x + 1), metaprox.Task(x, x + 500.0)])
    assert math.isfinite(diag["meta_grad_norm"]) and diag["meta_grad_norm"] <= 1.0


def test_shared_groups_are_refused_by_rules_that_cannot_tie_parameters():
    import pytest

    import metaprox
    from metaprox.prox import GroupL2

    model = metaprox.MLP([1, 4, 1])
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="does not support 'shared' parameter groups"):
        metaprox.MetaMinibatchProx(model, "mse", lam=GroupL2({"0.*": "shared", "*": 1.0}, names))
