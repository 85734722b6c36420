"""MMP limits and data options: λ → ∞ gives the joint-training gradient; inner_data='support+query'."""

from __future__ import annotations

import itertools

import pytest
import torch
from _helpers import DTYPE, flat, linear_tasks, meta_grad, sine_tasks, tiny_mlp
from torch import nn

import metaprox


def _linear() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(4, 1).to(DTYPE)


def test_large_lambda_approaches_joint_training_gradient():
    # exact prox on quadratics: λ(w − v*) = (I + A/λ)⁻¹ ∇L(w) = ∇L(w) − A∇L(w)/λ + O(1/λ²), so once λ ≫ ‖A‖
    # (here ‖A‖ ≈ 50) the relative error falls ~10× per decade of λ
    tasks, weights = linear_tasks(3), [0.2, 0.3, 0.5]
    model = _linear()
    joint = 0
    for a, t in zip(weights, tasks, strict=True):
        model.zero_grad()
        ((model(t.x) - t.y) ** 2).mean().backward()
        joint = joint + a * flat([p.grad.clone() for p in model.parameters()])
    errs = []
    for lam in (1e3, 1e4, 1e5, 1e6):
        mmp = metaprox.MetaMinibatchProx(_linear(), "mse", lam=lam, inner=metaprox.ExactLeastSquares())
        errs.append(float((flat(meta_grad(mmp, tasks, weights)) - joint).norm() / joint.norm()))
    assert all(a / 12 < b < a / 8 for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 1e-4


def test_large_lambda_with_mlp_and_sgd():
    tasks = sine_tasks(3, query=False)
    model = tiny_mlp()
    joint = 0
    for t in tasks:
        model.zero_grad()
        ((model(t.x) - t.y) ** 2).mean().backward()
        joint = joint + flat([p.grad.clone() for p in model.parameters()]) / 3
    lam = 1e4  # prox problem is λ-strongly convex and well conditioned: GD with lr 1/λ converges in few steps
    mmp = metaprox.MetaMinibatchProx(tiny_mlp(), "mse", lam=lam, inner=metaprox.SGD(lr=1 / lam, steps=30))
    err = float((flat(meta_grad(mmp, tasks)) - joint).norm() / joint.norm())
    assert err < 1e-2, err


def test_support_plus_query_solves_on_the_union():
    tasks = sine_tasks(3)
    union = [metaprox.Task(torch.cat([t.x, t.x_query]), torch.cat([t.y, t.y_query])) for t in tasks]
    sgd = metaprox.SGD(lr=0.05, steps=5)
    both = metaprox.MetaMinibatchProx(tiny_mlp(), lam=0.5, inner=sgd, inner_data="support+query")
    a = flat(meta_grad(both, tasks))
    b = flat(meta_grad(metaprox.MetaMinibatchProx(tiny_mlp(), lam=0.5, inner=sgd), union))
    c = flat(meta_grad(metaprox.MetaMinibatchProx(tiny_mlp(), lam=0.5, inner=sgd), tasks))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (a - c).norm() > 1e-3 * a.norm()  # default: support set only
    with pytest.raises(ValueError, match="inner_data='support\\+query'"):
        metaprox.MetaMinibatchProx(tiny_mlp(), inner_data="support+query").step(sine_tasks(2, query=False))
    with pytest.raises(ValueError, match="unknown inner_data"):
        metaprox.MetaMinibatchProx(tiny_mlp(), inner_data="query")


def test_adapt_uses_support_only_even_with_union_training():
    (t,) = sine_tasks(1)
    mmp = metaprox.MetaMinibatchProx(tiny_mlp(), lam=0.5, inner_data="support+query")
    ref = metaprox.MetaMinibatchProx(tiny_mlp(), lam=0.5)
    for n, p in mmp.adapt(t).items():
        assert torch.equal(p, ref.adapt(metaprox.Task(t.x, t.y))[n])
