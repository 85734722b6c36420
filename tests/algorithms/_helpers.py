"""Shared fixtures of the algorithm tests: small float64 tasks and models, meta-gradients without a step."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

import metaprox
from metaprox.algorithms.base import MetaLearner

DTYPE = torch.float64


def tiny_mlp(sizes: Sequence[int] = (1, 4, 4, 1), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return metaprox.MLP(list(sizes)).to(DTYPE)


def sine_tasks(num: int = 3, k: int = 5, kq: int = 6, seed: int = 0,
               query: bool = True) -> list[metaprox.Task]:
    """Sine regression tasks (Finn et al. 2017): amplitude in [0.1, 5], phase in [0, π], x in [−5, 5]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        amp = 0.1 + 4.9 * torch.rand(1, generator=g, dtype=DTYPE)
        phase = 3.14 * torch.rand(1, generator=g, dtype=DTYPE)
        x = torch.rand(k, 1, generator=g, dtype=DTYPE) * 10 - 5
        xq = torch.rand(kq, 1, generator=g, dtype=DTYPE) * 10 - 5
        y, yq = amp * torch.sin(x + phase), amp * torch.sin(xq + phase)
        out.append(metaprox.Task(x, y, xq, yq) if query else metaprox.Task(x, y))
    return out


def linear_tasks(num: int = 3, n: int = 8, nq: int = 7, d: int = 4, seed: int = 0) -> list[metaprox.Task]:
    """Linear regression tasks with features of very different scales (CG needs all d+1 steps)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-0.5, 0.7, d, dtype=DTYPE)
    out = []
    for _ in range(num):
        theta = torch.randn(d, 1, generator=g, dtype=DTYPE)
        x = torch.randn(n, d, generator=g, dtype=DTYPE) * scales
        xq = torch.randn(nq, d, generator=g, dtype=DTYPE) * scales
        out.append(metaprox.Task(x, x @ theta + 0.3, xq, xq @ theta + 0.3
                                 + 0.1 * torch.randn(nq, 1, generator=g, dtype=DTYPE)))
    return out


def meta_grad(learner: MetaLearner, tasks: Sequence[metaprox.Task],
              weights: Sequence[float] | None = None) -> list[torch.Tensor]:
    """The rule's meta-gradient at the current prior (no outer step is taken)."""
    a = torch.tensor(weights if weights is not None else [1.0] * len(tasks), dtype=torch.float64)
    return learner.solve_and_meta_gradient(tasks, learner.center(), a / a.sum(), monitor=False)[1]


def flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


class SavedTensorPeak:
    """Peak bytes of tensors saved for backward that are alive at once (``saved_tensors_hooks``).

    Deterministic stand-in for "memory": a graph kept across inner steps (second-order MAML) makes the peak
    grow with the number of steps; a first-order rule frees each gradient's graph before building the next.
    """

    def __init__(self) -> None:
        self.live = self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def pack(self, t: torch.Tensor) -> object:
        # keep a detached alias: holding ``t`` itself would tie a saved *output* to its own grad_fn (a
        # reference cycle through C++ that is never freed); autograd re-attaches the graph edge on unpack
        box = _Box(t.detach())
        nbytes = t.numel() * t.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._release, nbytes)
        return box

    @staticmethod
    def unpack(box: object) -> torch.Tensor:
        return box.t  # type: ignore[attr-defined]

    def __enter__(self) -> SavedTensorPeak:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


class _Box:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
