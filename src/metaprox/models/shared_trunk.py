"""`SharedTrunk`: one trunk shared by all tasks, with task-kind–specific input encoders and output heads.

Tasks of different *shapes* — 5-, 10- and 20-way classification, regression with different output dimensions,
inputs of different widths — can share a trunk when each kind of task brings its own head (and, optionally, its
own input encoder). ``SharedTrunk(trunk, heads={"5way": nn.Linear(64, 5), "20way": nn.Linear(64, 20)})``
holds them; :meth:`SharedTrunk.member` returns, per kind, an ``nn.Sequential`` ``encoder → trunk → head`` whose
parameters are named ``encoder.*``, ``trunk.*`` and ``head.*`` and whose ``trunk`` *is* the shared module (same
parameter tensors). Such a member is an ordinary model for every execution strategy (a Sequential of Linear
layers and activations gets the fast batched path).

The module only describes the architecture; who is pulled toward what is decided by the learner
(:class:`metaprox.algorithms.multihead.MultiHeadMMP`, :class:`~metaprox.algorithms.multihead.FiniteMultiHeadMMP`):
the trunk is prox-coupled to the center, heads and encoders are private to each task.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["SharedTrunk"]


class SharedTrunk(nn.Module):
    """A trunk plus one head (and optionally one input encoder) per task kind.

    Args:
        trunk: the shared module (its parameters are the meta-learned center).
        heads: kind name → output head (any shapes; kinds may differ in output size).
        encoders: kind name → input encoder (optional, kinds without one feed the trunk directly).
    """

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module],
                 encoders: Mapping[str, nn.Module] | None = None):
        super().__init__()
        if not heads:
            raise ValueError("SharedTrunk needs at least one head.")
        encoders = dict(encoders or {})
        unknown = set(encoders) - set(heads)
        if unknown:
            raise ValueError(f"encoders for kinds without a head: {sorted(unknown)}.")
        for k in heads:
            if not isinstance(k, str) or not k or "." in k:
                raise ValueError(f"kind names must be non-empty strings without '.', got {k!r}.")
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))
        self.encoders = nn.ModuleDict(encoders)
        self._members: dict[str, nn.Sequential] = {}

    @property
    def kinds(self) -> list[str]:
        return list(self.heads.keys())

    def member(self, kind: str) -> nn.Sequential:
        """``encoder → trunk → head`` of ``kind`` as one Sequential (shares the trunk's parameter tensors)."""
        if kind not in self.heads:
            raise KeyError(f"unknown task kind {kind!r}; known: {self.kinds}.")
        if kind not in self._members:
            parts: list[tuple[str, nn.Module]] = []
            if kind in self.encoders:
                parts.append(("encoder", self.encoders[kind]))
            parts += [("trunk", self.trunk), ("head", self.heads[kind])]
            # stored outside the module tree (a plain dict), so state_dict() lists every tensor once
            self._members[kind] = nn.Sequential(OrderedDict(parts))
        return self._members[kind]

    def forward(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        return self.member(kind)(x)
