"""Where a classifier's linear head starts — and is pulled to — at test time: the prior's, or the support's prototypes.

``MetaLearner.test_head_init`` (config ``eval.head_init``) chooses the head's center in a new episode's prox problem
``min_v L_T(v) + λ/2 ‖v − c_T‖²``:

- ``"prior"`` (default): ``c_T = w`` for every parameter, the head included (zero after pretraining:
  :func:`metaprox.pretrain.start_from_backbone`).
- ``"prototypes"``: the backbone's center stays w; the head's center (and so the solve's start) is set from the
  episode's support set — ``μ_c``, the mean of the class-c support features *as the head sees them* (the backbone at
  its center, the support set as one batch, as the inner solve computes it), gives the rows
  ``W_c = μ_c/‖μ_c‖, b_c = 0`` for a cosine head (``model.cosine_scale`` > 0: the head already sees s·h/‖h‖, so
  step 0 is the cosine nearest-centroid classifier) and the ProtoNet/ProtoMAML rows ``W_c = 2μ_c, b_c = −‖μ_c‖²``
  for a plain linear head (Triantafillou et al. 2020: step 0 is the Euclidean nearest-centroid classifier, as
  ``2μ·h − ‖μ‖² = ‖h‖² − ‖h − μ‖²``). The head's prior becomes data-dependent; λ_head pulls toward these rows.

It needs a classifier (cross-entropy) whose trainable parameters include ``head.weight`` and ``head.bias`` of an
``nn.Linear`` named ``head`` (Conv-4, ResNet-12, an ``nn.Sequential`` with a ``head`` entry), and a learner with one
head (the multi-head learners have one per kind); anything else is refused when the attribute is set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaprox.solve import PerTask, stacked
from metaprox.tasks.task import Task

__all__ = ["HEAD_INITS", "check_head_init", "head_center", "using_head_init"]

HEAD_INITS = ("prior", "prototypes")
HEAD = ("head.weight", "head.bias")
Tensors = list[torch.Tensor]


def check_head_init(learner: Any, value: str) -> None:
    """Refuse a ``value`` that ``learner`` cannot use (ValueError naming the problem and what to do)."""
    if value not in HEAD_INITS:
        raise ValueError(f"unknown head init {value!r}; choose one of {HEAD_INITS}.")
    if value == "prior":
        return
    if getattr(learner, "kinds", None):
        raise ValueError(f"head init 'prototypes' needs a learner with one head; {type(learner).__name__} has one "
                         f"per task kind. Use 'prior'.")
    if learner.loss.name != "cross_entropy":
        raise ValueError(f"head init 'prototypes' needs a classifier (loss 'cross_entropy'), not loss "
                         f"{learner.loss.name!r}: a regression task has no classes to average. Use 'prior'.")
    head = getattr(learner.fmodel.module, "head", None)
    if not (isinstance(head, nn.Linear) and head.bias is not None and all(n in learner.names for n in HEAD)):
        raise ValueError(f"head init 'prototypes' needs a model whose trainable head is an nn.Linear with a bias "
                         f"named 'head' (parameters {HEAD}); {type(learner.fmodel.module).__name__} has none "
                         f"(its trainable parameters: {learner.names[:4]}{'…' if len(learner.names) > 4 else ''}). "
                         f"Use 'prior', or name the model's classifier layer 'head'.")


@contextmanager
def using_head_init(learner: Any, value: str) -> Iterator[None]:
    """Within the block ``learner`` adapts with ``test_head_init = value``; its own setting is restored after."""
    own = learner.test_head_init
    learner.test_head_init = value
    try:
        yield
    finally:
        learner.test_head_init = own


def _head_inputs(learner: Any, params: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Features (b, n, d) the head sees on a stack of tasks: the head replaced by the identity (exact:
    F.linear(h, I, 0) = h, as :func:`metaprox.pretrain.embed`), predicted as the solve's oracle predicts."""
    i_w, i_b = (learner.names.index(n) for n in HEAD)
    b, width = x.shape[0], params[i_w].shape[-1]
    eye = torch.eye(width, dtype=params[i_w].dtype, device=params[i_w].device)
    v = list(params)
    v[i_w], v[i_b] = eye.expand(b, width, width), eye.new_zeros(b, width)
    return learner.execution.oracle(x, y).predict(v, x)


def head_center(learner: Any, tasks: Sequence[Task], center: Tensors) -> Tensors:
    """The test-time center of ``tasks`` under ``learner.test_head_init``: ``center`` itself for ``"prior"``,
    else a :class:`~metaprox.solve.PerTask` stack whose head rows are each task's prototype rows (module doc)."""
    if learner.test_head_init == "prior":
        return center
    check_head_init(learner, learner.test_head_init)  # the model or loss may have changed since it was set
    i_w, i_b = (learner.names.index(n) for n in HEAD)
    n = len(tasks)
    per_task = isinstance(center, PerTask)
    out = PerTask(t if per_task else t.expand(n, *t.shape) for t in center)
    ways, width = center[i_w].shape[-2:]
    out[i_w] = center[i_w].new_empty(n, ways, width)
    out[i_b] = center[i_b].new_empty(n, ways)
    cosine = float(getattr(learner.fmodel.module, "cosine_scale", 0.0)) > 0
    for idx, x, y in stacked(learner.execution, tasks):
        rows = torch.as_tensor(idx)
        params = [t[rows] for t in out]  # the tasks' backbone centers (their head rows are replaced below)
        with torch.no_grad():
            feats = _head_inputs(learner, params, x, y)
            labels = y.long()
            if bool((labels < 0).any()) or bool((labels >= ways).any()):
                raise ValueError(f"head init 'prototypes': support labels must lie in [0, {ways}) for a head with "
                                 f"{ways} outputs, got labels {labels.min().item()}..{labels.max().item()}.")
            onehot = F.one_hot(labels, ways).to(feats.dtype)  # (b, n, ways)
            counts = onehot.sum(1)  # (b, ways)
            if bool((counts == 0).any()):
                task, cls = (int(i) for i in (counts == 0).nonzero()[0])
                raise ValueError(f"head init 'prototypes': task {idx[task]} has no support example of class {cls}; "
                                 f"every one of the head's {ways} classes needs one (or use 'prior').")
            mu = onehot.transpose(1, 2) @ feats / counts.unsqueeze(-1)  # (b, ways, d): class means
            if cosine:
                out[i_w][rows], out[i_b][rows] = F.normalize(mu, dim=-1, eps=1e-12), 0.0
            else:
                out[i_w][rows], out[i_b][rows] = 2 * mu, -mu.square().sum(-1)
    return out
