"""metaprox.threads: thread count by work size, restored after the block; FLOP count of a gradient (closed form)."""

from __future__ import annotations

import torch

import metaprox
from metaprox import threads
from metaprox.execution import FunctionalModel
from metaprox.losses import resolve_loss


def test_choose_threads_by_work_size():
    per = threads.FLOPS_PER_THREAD
    assert threads.choose_threads(0, 8) == 1
    assert threads.choose_threads(per * 0.5, 8) == 1
    assert threads.choose_threads(per * 3.7, 8) == 3
    assert threads.choose_threads(per * 1e3, 8) == 8  # never above the ceiling
    assert threads.choose_threads(per * 1e3) == torch.get_num_threads()


def test_limited_threads_sets_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.limited_threads(1e3) as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.limited_threads(lambda: 1e12) as n:
            assert n == 2 and torch.get_num_threads() == 2
        threads.set_auto(False)
        with threads.limited_threads(1e3) as n:
            assert n == 2 and torch.get_num_threads() == 2
    finally:
        threads.set_auto(True)
        torch.set_num_threads(before)


def test_gradient_flops_of_an_mlp_is_the_closed_form():
    fm = FunctionalModel(metaprox.MLP([1, 40, 40, 1]))
    b, n = 7, 10
    x, y = torch.rand(b, n, 1), torch.rand(b, n, 1)
    macs = n * (1 * 40 + 40 * 40 + 40 * 1)
    # forward 2·macs, weight gradients 2·macs, input gradients of every layer but the first
    expected = b * (2 * macs + 2 * macs + 2 * n * (40 * 40 + 40 * 1))
    assert threads.gradient_flops(fm, resolve_loss("mse"), x, y) == expected
