"""A finite task set whose tasks come in *kinds* (``[[task.kinds]]``): one table or preset per kind, each with its
own features and targets, around one shared trunk.

Each kind is read, split and standardised like a one-table finite set (:func:`metaprox.finite_data.
load_finite_data` on :func:`metaprox.config.kind_config`); its tasks are numbered after those of the kinds before
it. The model (:func:`kinds_model`) is a :class:`~metaprox.models.shared_trunk.SharedTrunk`: per kind an input
encoder ``Linear(features_k, heads.width)`` + activation (nonlinear, so that it is not folded into the trunk's
first layer) and a linear head to the kind's outputs; the trunk is the hidden layers of ``model.sizes`` (its first
and last widths are the kinds'), each followed by ``model.activation``. The learner is
:class:`~metaprox.algorithms.multihead.FiniteMultiHeadMMP` (:func:`open_kinds_learner`): the trunk is pulled
toward the center w, encoders and heads are private to each task, every task's row (its own shape) persists in
its kind's store ``store-<kind>-rank0-of-1/`` (:func:`metaprox.sharded.open_shard`), checkpointed together with
the meta state by :func:`metaprox.sharded.save`. All kinds share one loss (regression or classification), and
what the learner cannot do with kinds is refused by :func:`metaprox.composition.kinds_refusal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metaprox import sharded
from metaprox.algorithms.multihead import FiniteMultiHeadMMP
from metaprox.build import build_inner, finite_lam, finite_sampler, optimizer_factory
from metaprox.composition import kinds_refusal
from metaprox.config import ConfigError, kind_config
from metaprox.distributed import Reducer
from metaprox.finite_data import FiniteData, load_finite_data
from metaprox.models.mlp import ACTIVATIONS, MLP
from metaprox.models.shared_trunk import SharedTrunk
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSet

__all__ = ["FiniteKinds", "load_kinds", "kinds_model", "open_kinds_learner"]


@dataclass
class FiniteKinds:
    """The kinds of a finite set (``names``), each its own split :class:`FiniteData` (``parts``); the tasks of
    kind k are numbered ``offsets[k] .. offsets[k + 1] − 1``."""

    names: list[str]
    parts: list[FiniteData]

    @property
    def source(self) -> str:
        return ", ".join(f"{k}: {p.source}" for k, p in zip(self.names, self.parts, strict=True))

    @property
    def classify(self) -> bool:
        return self.parts[0].classify  # one loss for all kinds (load_kinds checks it)

    @property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum([len(p.names) for p in self.parts]).tolist()]

    @property
    def task_kinds(self) -> list[str]:
        """The kind of every task, in task order."""
        return [k for k, p in zip(self.names, self.parts, strict=True) for _ in p.names]

    @property
    def task_names(self) -> list[str]:
        """``kind/task`` of every task (task names may repeat across kinds)."""
        return [f"{k}/{t}" for k, p in zip(self.names, self.parts, strict=True) for t in p.names]

    def has(self, split: str) -> bool:
        """Whether every kind has rows of ``split``."""
        return all(p.has(split) for p in self.parts)

    def tasks(self, split: str) -> list[Task]:
        return [t for p in self.parts for t in p.tasks(split)]


def load_kinds(cfg: dict[str, Any]) -> FiniteKinds:
    """Every kind of ``task.kinds``, read and split (refusing kinds of different losses)."""
    entries = cfg["task"]["kinds"]
    parts = [load_finite_data(kind_config(cfg, entry)) for entry in entries]
    why = kinds_refusal(task_types={e["name"]: p.task_type for e, p in zip(entries, parts, strict=True)})
    if why is not None:
        raise ConfigError(f"task.kinds: {why}.")
    return FiniteKinds([e["name"] for e in entries], parts)


def kinds_model(cfg: dict[str, Any], kinds: FiniteKinds) -> SharedTrunk:
    """The shared trunk with each kind's encoder and head (see the module doc), seeded by ``seed``, in float64."""
    m, width = cfg["model"], int(cfg["heads"]["width"])
    hidden = [int(s) for s in m["sizes"][1:-1]]
    act = ACTIVATIONS[m["activation"]]
    torch.manual_seed(cfg["seed"])
    trunk = nn.Sequential(*MLP([width, *hidden], m["activation"]), act())
    encoders = {k: nn.Sequential(nn.Linear(int(p.data.x.shape[1]), width), act())
                for k, p in zip(kinds.names, kinds.parts, strict=True)}
    heads = {k: nn.Linear(hidden[-1], p.outputs) for k, p in zip(kinds.names, kinds.parts, strict=True)}
    return SharedTrunk(trunk, heads, encoders).to(torch.float64)


def open_kinds_learner(cfg: dict[str, Any], kinds: FiniteKinds, run_dir: str | Path, reducer: Reducer,
                       resume: bool) -> FiniteMultiHeadMMP:
    """The run's :class:`FiniteMultiHeadMMP` on the training rows of every kind, its stores opened in
    ``run_dir`` (fresh, or at the last checkpoint's step when ``resume``; the meta state is
    :func:`metaprox.sharded.load`'s)."""
    why = kinds_refusal(world_size=reducer.world_size)
    if why is not None:
        raise ConfigError(f"task.kinds: {why}.")
    model = kinds_model(cfg, kinds)
    counts = np.diff(kinds.offsets).tolist()
    stores = {k: sharded.open_shard(run_dir, sharded.layout_of(model.member(k)), n, reducer, resume=resume, kind=k)
              for k, n in zip(kinds.names, counts, strict=True)}
    f, o, h = cfg["finite"], cfg["outer"], cfg["heads"]
    train = TaskSet(kinds.tasks("train"), kinds.task_names)
    loss = "cross_entropy" if kinds.classify else "mse"
    return FiniteMultiHeadMMP(model, train, kinds.task_kinds, loss,
                              lam=finite_lam(cfg), head_lam=float(h["head_lam"]), head_init=h["head_init"],
                              task_lam=f["task_lam"], inner=build_inner(cfg), stores=stores,
                              sampler=finite_sampler(cfg, len(train)), meta_optimizer=optimizer_factory(cfg),
                              outer_lr=o["lr"], total_steps=o["steps"], schedule=o["schedule"],
                              execution=cfg["execution"], seed=cfg["seed"])
