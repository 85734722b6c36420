"""Conv4: batched forward == per-task functional_call (values and gradients), BN modes, strategies."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import metaprox
from metaprox.models.conv4 import Conv4

torch.set_num_threads(1)


def _stacked(model: Conv4, b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v.detach().unsqueeze(0).repeat(b, *[1] * v.dim())
        + 0.1 * torch.randn(b, *v.shape, generator=g)
        for k, v in model.named_parameters()
    }


@pytest.mark.parametrize(
    "bn,training", [("batch", True), ("transductive", True), ("running", True), ("running", False)]
)
@pytest.mark.parametrize("channels,size,channels_last", [(1, 16, False), (3, 20, True)])
@pytest.mark.parametrize("classes", [3, 0])  # 0: no head, the features (a trunk for per-kind heads)
def test_forward_batched_matches_loop_with_gradients(bn, training, channels, size, channels_last, classes):
    torch.manual_seed(0)
    model = Conv4(channels, classes, filters=4, image_size=size, bn=bn, channels_last=channels_last)
    if bn == "running":
        model.update_running_stats(torch.rand(6, channels, size, size))
    model.train(training)
    b, n = 3, 5
    x = torch.rand(b, n, channels, size, size)
    params = _stacked(model, b)
    pb = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = model.forward_batched(pb, x)
    grads_b = torch.autograd.grad(out.square().sum(), list(pb.values()))
    for t in range(b):
        pt = {k: v[t].clone().requires_grad_(True) for k, v in params.items()}
        ref = functional_call(model, pt, (x[t],))
        torch.testing.assert_close(out[t], ref, rtol=1e-4, atol=1e-5)
        grads_t = torch.autograd.grad(ref.square().sum(), list(pt.values()))
        for name, gb, gt in zip(pt, grads_b, grads_t, strict=True):
            torch.testing.assert_close(gb[t], gt, rtol=1e-3, atol=1e-5, msg=name)


def test_output_shape_and_input_checks():
    model = Conv4(1, 5, filters=8, image_size=28)
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 5)
    assert model(torch.rand(4, 28, 28)).shape == (4, 5)  # channel axis added for greyscale
    assert model.head.in_features == 8  # 28 → 14 → 7 → 3 → 1
    with pytest.raises(ValueError, match="C = 1"):
        model(torch.rand(4, 3, 28, 28))
    trunk = Conv4(1, 0, filters=8, image_size=28)  # no head: the flattened features, filters · 1²
    assert trunk(torch.rand(4, 1, 28, 28)).shape == (4, 8) and trunk.head is None
    assert not any(n.startswith("head.") for n, _ in trunk.named_parameters())
    with pytest.raises(ValueError, match="num_classes ≥ 0"):
        Conv4(1, -1)
    with pytest.raises(ValueError, match="BatchNorm mode"):
        Conv4(bn="instance")
    with pytest.raises(ValueError, match="too small"):
        Conv4(image_size=8)


def test_running_stats_are_explicit():
    model = Conv4(1, 2, filters=4, image_size=16, bn="running")
    before = model.norm0.running_mean.clone()
    model.train()
    model(torch.rand(5, 1, 16, 16))  # a forward never writes buffers
    torch.testing.assert_close(model.norm0.running_mean, before)
    model.update_running_stats(torch.rand(5, 1, 16, 16) + 1.0)
    assert not torch.equal(model.norm0.running_mean, before)
    with pytest.raises(RuntimeError, match="bn='running'"):
        Conv4(1, 2, filters=4, image_size=16, bn="batch").update_running_stats(torch.rand(2, 1, 16, 16))


def test_predict_protocols():
    torch.manual_seed(0)
    xs, xq = torch.rand(6, 1, 16, 16), torch.rand(4, 1, 16, 16)
    trans = Conv4(1, 3, filters=4, image_size=16, bn="transductive")
    torch.testing.assert_close(trans.predict(xs, xq), trans(xq))
    batch = Conv4(1, 3, filters=4, image_size=16, bn="batch")
    full = batch.predict(xs, xq)
    # non-transductive: a query example's prediction does not depend on the other query examples
    torch.testing.assert_close(batch.predict(xs, xq[1:2]), full[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full[2], batch(torch.cat([xs, xq[2:3]]))[-1], rtol=1e-4, atol=1e-5)
    running = Conv4(1, 3, filters=4, image_size=16, bn="running")
    running.update_running_stats(xs)
    running.eval()
    expected = running(xq)
    running.train()
    torch.testing.assert_close(running.predict(xs, xq), expected)
    assert running.training


@pytest.mark.parametrize("execution", ["batched", "vmap"])
def test_mmp_step_agrees_with_loop(execution):
    gen = torch.Generator().manual_seed(1)
    tasks = [
        metaprox.Task(torch.rand(6, 1, 16, 16, generator=gen), torch.arange(3).repeat(2))
        for _ in range(3)
    ]
    results = {}
    for ex in ("loop", execution):
        torch.manual_seed(0)
        model = Conv4(1, 3, filters=4, image_size=16)
        mmp = metaprox.MetaMinibatchProx(
            model,
            "cross_entropy",
            lam=0.5,
            inner=metaprox.Adam(lr=1e-2, steps=2, beta1=0.0),
            execution=ex,
        )
        mmp.step(tasks, monitor=False)
        results[ex] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(results["loop"], results[execution], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cosine_head_sees_scaled_unit_features(channels_last):
    """cosine_scale = s: the head's input has norm s, is invariant to the features' scale, batched == per task."""
    torch.manual_seed(0)
    s = 10.0
    model = Conv4(3, 4, filters=4, image_size=20, bn="batch", channels_last=channels_last, cosine_scale=s)
    x = torch.rand(6, 3, 20, 20)
    width = model.head.in_features
    params = {k: v.detach() for k, v in model.named_parameters()}
    identity = {**params, "head.weight": torch.eye(width), "head.bias": torch.zeros(width)}
    feats = functional_call(model, identity, (x,))
    torch.testing.assert_close(feats.norm(dim=1), torch.full((6,), s))
    # the last block is positively homogeneous in (γ, β) of norm3: doubling both doubles h, not the logits
    doubled = {**params, "norm3.weight": 2 * params["norm3.weight"], "norm3.bias": 2 * params["norm3.bias"]}
    torch.testing.assert_close(functional_call(model, doubled, (x,)), functional_call(model, params, (x,)))
    plain = Conv4(3, 4, filters=4, image_size=20, bn="batch", channels_last=channels_last)
    raw = functional_call(plain, identity, (x,))
    torch.testing.assert_close(feats, s * raw / raw.norm(dim=1, keepdim=True))
    stacked = _stacked(model, 2)
    out = model.forward_batched(stacked, x.view(2, 3, 3, 20, 20))
    for t in range(2):
        ref = functional_call(model, {k: v[t] for k, v in stacked.items()}, (x.view(2, 3, 3, 20, 20)[t],))
        torch.testing.assert_close(out[t], ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cosine_scale"):
        Conv4(cosine_scale=-1.0)
