"""Hand-derived task-batched backward pass for Linear/elementwise stacks with the mse or cross-entropy loss.

For small MLPs the autograd engine's per-call overhead dominates an inner step (profile of the sine recipe:
~30% of the time in ``run_backward`` alone). Back-propagating by hand through ``baddbmm`` layers removes it;
results equal autograd's to round-off (tested). Used by the ``fused`` execution strategy; returns None for
models or losses it does not cover, so callers fall back to autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fused_value_and_grad", "FusedValueAndGrad"]

FusedValueAndGrad = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor],
                             tuple[torch.Tensor, list[torch.Tensor]]]

# activation → (forward, derivative expressed through the activation's *output*)
_ACTS: dict[type, tuple[Callable, Callable | None]] = {
    nn.Tanh: (torch.tanh, lambda h: 1 - h * h),
    nn.Sigmoid: (torch.sigmoid, lambda h: h * (1 - h)),
    nn.ReLU: (torch.relu, lambda h: (h > 0).to(h.dtype)),
    nn.Identity: (lambda h: h, None),
}


def _layers(model: nn.Module) -> list[tuple[str, object]] | None:
    if not isinstance(model, nn.Sequential):
        return None
    out: list[tuple[str, object]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            if child.bias is None:
                return None
            out.append(("linear", name))
        elif type(child) in _ACTS:
            out.append(("act", type(child)))
        else:
            return None
    return out if out and out[0][0] == "linear" else None


def fused_value_and_grad(model: nn.Module, loss_name: str, names: list[str]) -> FusedValueAndGrad | None:
    """``f(params, x, y) -> (per-task losses, per-task grads)`` for params/x/y with a leading task axis."""
    layers = _layers(model)
    if layers is None or loss_name not in ("mse", "cross_entropy"):
        return None
    expected = [f"{n}.{k}" for kind, n in layers if kind == "linear" for k in ("weight", "bias")]
    if expected != list(names):
        return None
    pos = {n: i for i, n in enumerate(names)}

    def value_and_grad(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        if x.dim() != 3:
            raise ValueError("fused execution needs per-task inputs of shape (n, features).")
        h = x
        saved: list[tuple[str, object, torch.Tensor]] = []  # (kind, layer info, input to that layer)
        for kind, info in layers:
            if kind == "linear":
                w, b = params[pos[f"{info}.weight"]], params[pos[f"{info}.bias"]]
                saved.append(("linear", info, h))
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            else:
                fwd, deriv = _ACTS[info]  # type: ignore[index]
                h = fwd(h)
                saved.append(("act", deriv, h))
        bsz = h.shape[0]
        if loss_name == "mse":
            diff = h - y
            losses = diff.square().flatten(1).mean(1)
            d = diff * (2.0 / diff[0].numel())
        else:
            logp = F.log_softmax(h, dim=-1)
            losses = -logp.gather(-1, y.long().unsqueeze(-1)).squeeze(-1).flatten(1).mean(1)
            d = logp.exp()
            d.scatter_add_(-1, y.long().unsqueeze(-1), torch.full_like(d[..., :1], -1.0))
            d = d / y[0].numel()
        grads: list[torch.Tensor | None] = [None] * len(names)
        for i in range(len(saved) - 1, -1, -1):
            kind, info, t = saved[i]
            if kind == "act":
                if info is not None:
                    d = d * info(t)  # type: ignore[operator]
                continue
            w = params[pos[f"{info}.weight"]]
            grads[pos[f"{info}.weight"]] = torch.bmm(d.transpose(1, 2), t)
            grads[pos[f"{info}.bias"]] = d.sum(1)
            if i > 0:
                d = torch.bmm(d, w)
        del bsz
        return losses, grads

    return value_and_grad
