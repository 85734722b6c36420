"""Per-task layout (the fast CPU path for colour images) equals the grouped layout for every rule: Conv-4, ResNet-12."""

from __future__ import annotations

import pytest
import torch

import metaprox
from metaprox.models.conv4 import Conv4
from metaprox.models.resnet12 import ResNet12

torch.set_num_threads(1)

SGD = metaprox.SGD(lr=0.1, steps=3)
ADAM = metaprox.Adam(lr=1e-2, steps=3, beta1=0.0)
RULES = {
    "mmp": lambda m: metaprox.MetaMinibatchProx(m, "cross_entropy", lam=0.5, inner=ADAM, execution="batched"),
    "reptile": lambda m: metaprox.Reptile(m, "cross_entropy", inner=ADAM, execution="batched"),
    "fomaml": lambda m: metaprox.FOMAML(m, "cross_entropy", inner=ADAM, execution="batched"),
    "maml": lambda m: metaprox.MAML(m, "cross_entropy", inner=SGD, execution="batched"),
    "imaml": lambda m: metaprox.IMAML(m, "cross_entropy", lam=0.5, inner=ADAM, cg_steps=3, execution="batched"),
}


def _tasks(dtype=torch.float64) -> list[metaprox.Task]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(2)
    return [metaprox.Task(torch.rand(6, 3, 16, 16, generator=g, dtype=dtype), y,
                          torch.rand(6, 3, 16, 16, generator=g, dtype=dtype), y) for _ in range(3)]


MODELS = {
    "conv4": lambda layout: Conv4(3, 3, filters=4, image_size=16, bn="transductive", task_layout=layout),
    "resnet12": lambda layout: ResNet12(3, 3, widths=(3, 4, 5, 6), bn="transductive", task_layout=layout),
}


def _meta_grad(rule: str, layout: str, dtype=torch.float64, model: str = "conv4") -> torch.Tensor:
    torch.manual_seed(0)
    model = MODELS[model](layout).to(dtype)
    learner = RULES[rule](model)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    _, grads = learner.solve_and_meta_gradient(_tasks(dtype), learner.center(), weights, monitor=False)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_per_task_layout_equals_grouped_for_every_rule(rule, model):
    grouped, per_task = _meta_grad(rule, "grouped", model=model), _meta_grad(rule, "per_task", model=model)
    assert grouped.norm() > 0
    torch.testing.assert_close(per_task, grouped, rtol=1e-9, atol=1e-11)


def test_float32_default_layout_agrees_to_round_off():
    # the default ("auto") picks per-task for colour images on CPU: float32 meta-gradients agree to round-off
    assert Conv4(3, 3, filters=4, image_size=16)._per_task(torch.zeros(1, 1, 3, 16, 16))
    assert not Conv4(1, 3, filters=4, image_size=16)._per_task(torch.zeros(1, 1, 1, 16, 16))
    grouped, auto = _meta_grad("mmp", "grouped", torch.float32), _meta_grad("mmp", "auto", torch.float32)
    torch.testing.assert_close(auto, grouped, rtol=1e-3, atol=1e-5)


def test_unknown_layout_is_refused():
    for cls in (Conv4, ResNet12):
        with pytest.raises(ValueError, match="task_layout"):
            cls(task_layout="stacked")
