"""How a minibatch of tasks is solved: which tasks are stacked together, and how their gradients are computed.

Strategies (results agree up to float round-off; tested):
- ``batched``: one forward with a task axis (``baddbmm`` for Linear stacks, or a model's own
  ``forward_batched``), one backward of the summed task losses — per-task gradients, since tasks are
  independent. Fastest for MLPs.
- ``fused``: like ``batched`` but with a hand-derived backward (``models/fused.py``) for Linear/elementwise
  stacks with the mse or cross-entropy loss — no autograd engine in the inner loop. Fastest for small MLPs.
- ``vmap``: ``torch.func.vmap(grad_and_value(...))`` over stacked parameters; works for any module.
- ``loop``: one task at a time with autograd; any module, ragged tasks.

``auto`` picks ``fused`` where it applies, else ``batched`` where the model supports it, else ``vmap``;
tasks whose shapes match no other task in the minibatch run in a group of one. No autograd graph outlives
one gradient evaluation, so memory does not grow with the number of inner steps.

``precision="bf16"`` runs the model's forward and backward under ``torch.autocast(bfloat16)`` (``batched``
or ``loop``; ``auto`` then picks ``batched`` where it applies, else ``loop``): parameters, losses and
gradients stay float32. Speed, not exactness: bfloat16 keeps ~3 significant digits, and through
BatchNorm's backward the early-layer gradients of Conv-4 come out with ~20 % relative error
(tests/test_execution.py measures it); validate accuracy on validation tasks before adopting it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from metaprox.losses import Loss
from metaprox.models.batched import batched_forward
from metaprox.models.fused import fused_value_and_grad
from metaprox.tasks.task import Task

__all__ = ["FunctionalModel", "Oracle", "Execution", "STRATEGIES"]

STRATEGIES = ("auto", "fused", "batched", "vmap", "loop")
PRECISIONS = ("fp32", "bf16")
Tensors = list[torch.Tensor]


class FunctionalModel:
    """An ``nn.Module`` seen as a pure function of its trainable parameters (``functional_call``, strict)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to meta-learn.")
        self.frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad}
        self.buffers = dict(module.named_buffers())
        self.batched = batched_forward(module)

    def params(self) -> Tensors:
        named = dict(self.module.named_parameters())
        return [named[n] for n in self.names]

    def single(self, params: Tensors | dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        p = params if isinstance(params, dict) else dict(zip(self.names, params, strict=True))
        return functional_call(self.module, ({**p, **self.frozen}, self.buffers), (x,), strict=True)

    def run_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The task-batched forward (for callers that checked :meth:`batched_ok`): a leading task axis throughout."""
        if self.batched is None:
            raise RuntimeError(f"{type(self.module).__name__} has no task-batched forward; use execution='vmap'.")
        return self.batched(params, x)

    def batched_ok(self, x: torch.Tensor) -> bool:
        custom = hasattr(self.module, "forward_batched")
        return self.batched is not None and (custom or x.dim() == 3) and not self.frozen


def _gather(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        return t
    rows = torch.arange(t.shape[0], device=t.device).unsqueeze(1)
    return t[rows, idx]


class Oracle:
    """Loss and gradient of the data term L_T for a stack of B tasks of equal shapes.

    ``oracle(v, idx)`` → ``(losses (B,), grads)`` where ``v`` and ``grads`` are lists of tensors with a
    leading task axis and ``idx`` (B, m) optionally selects a minibatch of each task's examples.
    """

    def __init__(self, fmodel: FunctionalModel, loss: Loss, x: torch.Tensor, y: torch.Tensor, strategy: str,
                 precision: str = "fp32"):
        self.fmodel, self.loss, self.x, self.y, self.strategy = fmodel, loss, x, y, strategy
        self.precision = precision
        self.num_tasks, self.num_examples = int(x.shape[0]), int(x.shape[1])
        if strategy == "fused":
            fused = fused_value_and_grad(fmodel.module, loss.name, fmodel.names)
            if fused is None:
                raise ValueError("execution='fused' needs a Linear/activation stack with the mse or cross_entropy "
                                 "loss.")
            self.fused = fused
        if strategy == "vmap":
            names, single, lossf = fmodel.names, fmodel.single, loss.single

            def task_loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
                return lossf(single(params, xb), yb)

            self._vgrad = vmap(grad_and_value(task_loss))
            self._names = names

    def __call__(self, v: Tensors, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, Tensors]:
        x, y = _gather(self.x, idx), _gather(self.y, idx)
        if self.strategy == "fused":
            with torch.no_grad():
                return self.fused(v, x, y)
        if self.strategy == "batched":
            vs = [t.detach().requires_grad_(True) for t in v]
            with torch.enable_grad():
                with self._autocast():
                    out = self.fmodel.run_batched(dict(zip(self.fmodel.names, vs, strict=True)), x)
                losses = self.loss.batched(out.to(vs[0].dtype), y)
                grads = torch.autograd.grad(losses.sum(), vs)
            return losses.detach(), list(grads)
        if self.strategy == "vmap":
            grads, losses = self._vgrad(dict(zip(self._names, [t.detach() for t in v], strict=True)), x, y)
            return losses.detach(), [grads[n] for n in self._names]
        losses_l, grads_l = [], []
        for b in range(self.num_tasks):
            vs = [t[b].detach().requires_grad_(True) for t in v]
            with torch.enable_grad():
                with self._autocast():
                    out = self.fmodel.single(vs, x[b])
                lb = self.loss.single(out.to(vs[0].dtype), y[b])
                grads_l.append(torch.autograd.grad(lb, vs))
            losses_l.append(lb.detach())
        return torch.stack(losses_l), [torch.stack(g) for g in zip(*grads_l, strict=True)]

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16: the model's forward (and so its backward) under ``torch.autocast`` — convolutions and matmuls in
        bfloat16 (fast on CPUs with AMX/AVX-512 BF16 and on GPUs), parameters, loss and gradients in float32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.x.device.type, dtype=torch.bfloat16)

    def predict(self, v: Tensors, x: torch.Tensor) -> torch.Tensor:
        """Per-task predictions on ``x`` (B, m, ...) with per-task parameters ``v``; no graph."""
        with torch.no_grad():
            if self.strategy in ("batched", "fused"):
                return self.fmodel.run_batched(dict(zip(self.fmodel.names, v, strict=True)), x)
            if self.strategy == "vmap":
                return vmap(self.fmodel.single)(dict(zip(self.fmodel.names, v, strict=True)), x)
            return torch.stack([self.fmodel.single([t[b] for t in v], x[b]) for b in range(len(x))])


class Execution:
    """Groups tasks by shape and builds the gradient oracle of each group with the chosen strategy."""

    def __init__(self, fmodel: FunctionalModel, loss: Loss, strategy: str = "auto", precision: str = "fp32"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown execution strategy {strategy!r}; choose one of {STRATEGIES}.")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}.")
        if precision == "bf16" and strategy in ("fused", "vmap"):
            raise ValueError(f"precision 'bf16' (autocast) needs execution 'auto', 'batched' or 'loop', not "
                             f"{strategy!r}: the fused and vmap paths compute in the parameters' dtype.")
        self.fmodel, self.loss, self.strategy, self.precision = fmodel, loss, strategy, precision

    @staticmethod
    def groups(tasks: Sequence[Task]) -> list[list[int]]:
        """Indices of tasks that can be stacked (equal shapes and dtypes), in first-seen order."""
        by_key: dict[tuple, list[int]] = {}
        for i, t in enumerate(tasks):
            by_key.setdefault(t.shape_key(), []).append(i)
        return list(by_key.values())

    def fused_ok(self, x: torch.Tensor) -> bool:
        return (x.dim() == 3 and not self.fmodel.frozen
                and fused_value_and_grad(self.fmodel.module, self.loss.name, self.fmodel.names) is not None)

    def resolve(self, x: torch.Tensor) -> str:
        if self.strategy == "auto" and self.precision == "bf16":
            return "batched" if self.fmodel.batched_ok(x) else "loop"
        if self.strategy == "auto":
            return "fused" if self.fused_ok(x) else "batched" if self.fmodel.batched_ok(x) else "vmap"
        if self.strategy == "fused" and not self.fused_ok(x):
            raise ValueError("execution 'fused' needs an nn.Sequential of biased Linear layers and Tanh/ReLU/"
                             "Sigmoid/Identity with loss 'mse' or 'cross_entropy'; use 'batched', 'vmap' or 'loop'.")
        if self.strategy == "batched" and not self.fmodel.batched_ok(x):
            raise ValueError("execution 'batched' needs a model built from Linear layers and elementwise "
                             "activations with 2-d inputs (n, features), or one defining forward_batched; "
                             "use execution='vmap' or 'loop' for this model.")
        return self.strategy

    def oracle(self, x: torch.Tensor, y: torch.Tensor, query: bool = False) -> Oracle:
        return Oracle(self.fmodel, self.loss, x, y, self.resolve(x), self.precision)

    def stack(self, tasks: Sequence[Task], query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.fmodel.params()[0].device  # (a FunctionalModel has ≥ 1 parameter)
        if query:
            if any(not t.has_query for t in tasks):
                raise ValueError("this operation needs query sets, but a task has none (Task(x, y, x_query, y_query)).")
            # (every task has both, checked above: the filters only tell the type checker so)
            xs = [t.x_query for t in tasks if t.x_query is not None]
            ys = [t.y_query for t in tasks if t.y_query is not None]
        else:
            xs, ys = [t.x for t in tasks], [t.y for t in tasks]
        dtype = self.fmodel.params()[0].dtype
        if xs[0].dtype != dtype:
            raise TypeError(f"task inputs have dtype {xs[0].dtype} but the model's parameters are {dtype}; "
                            f"convert the data (x.to({dtype})) or the model (model.to({xs[0].dtype})).")
        return torch.stack(xs).to(device), torch.stack(ys).to(device)
