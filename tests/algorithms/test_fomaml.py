"""FOMAML: the query gradient at the adapted parameters (reference: fine-tune with torch.optim, backward)."""

from __future__ import annotations

import pytest
import torch
from _helpers import flat, meta_grad, sine_tasks, tiny_mlp

import metaprox


def test_query_gradient_at_fine_tuned_parameters():
    tasks, weights, lr, steps = sine_tasks(3), [0.3, 0.3, 0.4], 0.05, 4
    fo = metaprox.FOMAML(tiny_mlp(), "mse", inner=metaprox.SGD(lr=lr, steps=steps))
    g = flat(meta_grad(fo, tasks, weights))
    ref = 0
    for a, t in zip(weights, tasks, strict=True):
        m = tiny_mlp()
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            ((m(t.x) - t.y) ** 2).mean().backward()
            opt.step()
        m.zero_grad()
        ((m(t.x_query) - t.y_query) ** 2).mean().backward()
        ref = ref + a * flat([p.grad for p in m.parameters()])
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="query set"):
        metaprox.FOMAML(tiny_mlp(), "mse").step(sine_tasks(2, query=False))
