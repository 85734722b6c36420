"""Task losses: the data term L_T of the inner problem, per task, for one task or a stack of tasks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Loss", "resolve_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mse_batched(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred - y).square().flatten(1).mean(1)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    try:
        return F.cross_entropy(logits, labels.long(), reduction=reduction)
    except IndexError as e:  # torch's "Target 3 is out of bounds."
        raise ValueError(f"loss 'cross_entropy': a class label is out of range for the model's {logits.shape[-1]} "
                         f"outputs ({e}); labels must be 0..{logits.shape[-1] - 1} (relabel the classes, or give "
                         f"the model one output per class).") from None


def _ce_batched(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b = pred.shape[0]
    per = _cross_entropy(pred.flatten(0, 1), y.flatten(0, 1), "none")
    return per.view(b, -1).mean(1)


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred - y).square().mean()


def _ce(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _cross_entropy(pred, y, "mean")


@dataclass(frozen=True)
class Loss:
    """A task loss with a single-task form and a batched form (leading task axis → one value per task).

    ``single(pred, y)`` returns a scalar; ``batched(pred, y)`` returns shape ``(B,)``. For a user callable the
    batched form is ``torch.func.vmap`` of the callable.
    """

    name: str
    single: LossFn
    batched: LossFn

    def check_shapes(self, pred: torch.Tensor, y: torch.Tensor) -> None:
        """Catch silent broadcasting (e.g. pred (n, 1) against y (n,)), the classic regression bug."""
        if self.name == "mse" and not y.is_floating_point():
            raise ValueError(f"loss 'mse' needs floating-point targets, got {y.dtype} (class labels?); use "
                             f"loss='cross_entropy' for classification, or y.float() for regression.")
        if self.name == "mse" and pred.shape != y.shape:
            per_example = pred[0].numel() if pred.dim() else 1, y[0].numel() if y.dim() else 1
            fix = ("reshape y to the output's shape, e.g. y.view(-1, 1)" if per_example[0] == per_example[1] else
                   "check the model's output size and the input shape (a Linear layer maps only the last axis of "
                   "x, so x of shape (n, a, b) gives outputs (n, a, out): flatten x to (n, features))")
            raise ValueError(f"loss 'mse': model output has shape {tuple(pred.shape)} but targets have shape "
                             f"{tuple(y.shape)}; they must match: {fix}.")
        if self.name == "cross_entropy":
            if y.is_floating_point():
                raise ValueError(f"loss 'cross_entropy' needs integer class labels, got targets of dtype {y.dtype}.")
            if pred.dim() != y.dim() + 1 or pred.shape[: y.dim()] != y.shape:
                raise ValueError(f"loss 'cross_entropy': logits of shape {tuple(pred.shape)} do not fit labels "
                                 f"of shape {tuple(y.shape)} (expected logits (n, classes), labels (n,)).")


def resolve_loss(loss: str | LossFn | Loss) -> Loss:
    """Turn ``"mse"``, ``"cross_entropy"`` or a callable ``(pred, y) -> scalar`` into a :class:`Loss`."""
    if isinstance(loss, Loss):
        return loss
    if loss == "mse":
        return Loss("mse", _mse, _mse_batched)
    if loss == "cross_entropy":
        return Loss("cross_entropy", _ce, _ce_batched)
    if isinstance(loss, str):
        raise ValueError(f"unknown loss {loss!r}: use 'mse', 'cross_entropy' or a callable (pred, y) -> scalar.")
    if not callable(loss):
        raise TypeError(f"loss must be 'mse', 'cross_entropy' or a callable, got {type(loss).__name__}.")
    name = getattr(loss, "__name__", "custom")
    return Loss(name, loss, torch.func.vmap(loss))
