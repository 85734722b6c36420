"""Task-batched forward passes: run one model with a *different* parameter set per task in one call.

``torch.func.vmap`` does this for any module but pays per-op batching overhead; for networks built from
Linear layers and elementwise activations a forward written with ``baddbmm`` is ~2.5× faster on CPU
(see ``metaprox bench sine``). This module builds such a forward when it can, and returns None otherwise.

A custom module may opt in by defining ``forward_batched(params, x)`` where every tensor in ``params`` and
``x`` carries a leading task axis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["batched_forward", "BatchedForward"]

BatchedForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]

_ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.Softplus,
                nn.Identity, nn.Mish, nn.Hardtanh)


def _linear_op(prefix: str, has_bias: bool) -> Callable:
    w, b = prefix + "weight", prefix + "bias"
    if has_bias:
        return lambda p, h: torch.baddbmm(p[b].unsqueeze(1), h, p[w].transpose(1, 2))
    return lambda p, h: torch.bmm(h, p[w].transpose(1, 2))


def _ops(module: nn.Module, prefix: str) -> list[Callable] | None:
    if isinstance(module, nn.Sequential):
        ops: list[Callable] = []
        for name, child in module.named_children():
            sub = _ops(child, f"{prefix}{name}.")
            if sub is None:
                return None
            ops.extend(sub)
        return ops
    if isinstance(module, nn.Linear):
        return [_linear_op(prefix, module.bias is not None)]
    if isinstance(module, _ELEMENTWISE) and not list(module.parameters()):
        return [lambda p, h, m=module: m(h)]
    return None


def batched_forward(model: nn.Module) -> BatchedForward | None:
    """A function ``f(params, x)`` evaluating ``model`` per task on ``x`` of shape (B, n, features), or None.

    Only 2-d per-task inputs ``(n, features)`` are handled for Sequential models; callers must check shapes.
    """
    custom = getattr(model, "forward_batched", None)
    if callable(custom):
        return custom
    if list(model.buffers()):
        return None
    ops = _ops(model, "")
    if ops is None:
        return None

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x
        for op in ops:
            h = op(params, h)
        return h

    return forward
