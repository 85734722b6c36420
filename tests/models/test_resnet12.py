"""ResNet-12: shapes, batched forward == per-task functional_call (values, gradients), BN modes, tiny inputs."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import metaprox
from metaprox.models.resnet12 import ResNet12

torch.set_num_threads(1)
TINY = (3, 4, 5, 6)


def test_standard_shapes_and_parameter_count():
    model = ResNet12(3, 5)
    # 4 blocks of three 3×3 convs + a 1×1 shortcut, BN affine, 640 → 5 head: the standard 12.4M parameters
    expected = 0
    for cin, cout in zip((3, 64, 160, 320), (64, 160, 320, 640), strict=True):
        expected += 9 * cin * cout + 2 * 9 * cout * cout + cin * cout + 4 * 2 * cout
    expected += 640 * 5 + 5
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 12.3e6 < expected < 12.5e6
    assert model(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    small = ResNet12(3, 5, widths=TINY)
    assert small.forward_batched({k: v.unsqueeze(0).expand(2, *v.shape) for k, v in small.named_parameters()},
                                 torch.rand(2, 4, 3, 16, 16)).shape == (2, 4, 5)


def test_tiny_and_bad_inputs():
    model = ResNet12(3, 2, widths=TINY)
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 2)  # 16 → 8 → 4 → 2 → 1
    with pytest.raises(ValueError, match="H, W ≥ 16"):
        model(torch.rand(2, 3, 15, 15))
    with pytest.raises(ValueError, match="C = 3"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="BatchNorm mode"):
        ResNet12(bn="layer")
    with pytest.raises(ValueError, match="4 block widths"):
        ResNet12(widths=(8, 8))


@pytest.mark.parametrize("bn,training", [("batch", True), ("transductive", True), ("running", True),
                                         ("running", False)])
@pytest.mark.parametrize("layout", ["grouped", "per_task"])
def test_forward_batched_matches_loop_with_gradients(bn, training, layout):
    torch.manual_seed(0)
    model = ResNet12(3, 3, widths=TINY, bn=bn, task_layout=layout).double()
    if bn == "running":
        model.update_running_stats(torch.rand(6, 3, 16, 16, dtype=torch.float64))
    model.train(training)
    b, n = 3, 5
    x = torch.rand(b, n, 3, 16, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    params = {k: v.detach().unsqueeze(0).repeat(b, *[1] * v.dim())
              + 0.1 * torch.randn(b, *v.shape, generator=g, dtype=torch.float64)
              for k, v in model.named_parameters()}
    pb = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = model.forward_batched(pb, x)
    grads_b = torch.autograd.grad(out.square().sum(), list(pb.values()))
    for t in range(b):
        pt = {k: v[t].clone().requires_grad_(True) for k, v in params.items()}
        ref = functional_call(model, pt, (x[t],))
        torch.testing.assert_close(out[t], ref, rtol=1e-10, atol=1e-12)
        grads_t = torch.autograd.grad(ref.square().sum(), list(pt.values()))
        for name, gb, gt in zip(pt, grads_b, grads_t, strict=True):
            torch.testing.assert_close(gb[t], gt, rtol=1e-9, atol=1e-11, msg=name)


def test_running_stats_and_predict_protocols():
    model = ResNet12(3, 2, widths=TINY, bn="running")
    before = model.block0.bn_conv1.running_mean.clone()
    model(torch.rand(4, 3, 16, 16))  # a forward never writes buffers
    torch.testing.assert_close(model.block0.bn_conv1.running_mean, before)
    model.update_running_stats(torch.rand(4, 3, 16, 16) + 1.0)
    assert not torch.equal(model.block0.bn_conv1.running_mean, before)
    torch.manual_seed(0)
    xs, xq = torch.rand(4, 3, 16, 16), torch.rand(3, 3, 16, 16)
    batch = ResNet12(3, 2, widths=TINY, bn="batch")
    full = batch.predict(xs, xq)  # non-transductive: each query with the support set only
    torch.testing.assert_close(batch.predict(xs, xq[1:2]), full[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full[2], batch(torch.cat([xs, xq[2:3]]))[-1], rtol=1e-4, atol=1e-5)


def test_builds_from_config():
    from metaprox.build import build_model
    from metaprox.config import resolve

    cfg = resolve({"task": {"family": "fewshot", "dataset": "miniimagenet", "ways": 5},
                   "model": {"kind": "resnet12", "widths": [4, 6, 8, 10], "bn": "transductive"}})
    model = build_model(cfg)
    assert isinstance(model, ResNet12) and model.widths == (4, 6, 8, 10) and model.bn == "transductive"
    learner = metaprox.MetaMinibatchProx(model, "cross_entropy", lam=0.1, inner=metaprox.Adam(steps=1))
    y = torch.arange(5)
    learner.step([metaprox.Task(torch.rand(5, 3, 84, 84), y)], monitor=False)
