"""Multi-layer perceptron, e.g. the paper's 1-40-40-1 tanh network for sine regression."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
}


def MLP(sizes: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """An ``nn.Sequential`` of Linear layers with ``activation`` between them.

    ``MLP([1, 40, 40, 1])`` is the sine network of Finn et al. (2017) and Zhou et al. (2019). Being a plain
    Sequential of Linear and elementwise layers, it runs on the fast batched execution path.
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"MLP sizes must list at least input and output width, all ≥ 1; got {list(sizes)}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(int(a), int(b)))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
