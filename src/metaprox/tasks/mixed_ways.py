"""Few-shot episodes of several ways in one meta-batch (``heads.ways``): one task *kind*, and one head, per way.

Task i of a minibatch of n is of kind ``kinds[i mod K]`` (e.g. ``["5way", "20way"]``: 5-, 20-, 5-, 20-way …),
so every minibatch mixes the kinds in fixed positions; a minibatch is a
:class:`~metaprox.tasks.task.KindedTasks`, which tells :meth:`metaprox.MultiHeadMMP.step` each task's kind.
The episodes of each kind are drawn by their own :class:`~metaprox.tasks.episodes.EpisodeSampler` over the
same classes, in kind order, from one generator. Evaluation sets are one per kind, named by the kind
(``metaprox eval`` adapts each set with its kind's head).
"""

from __future__ import annotations

from typing import Any

import torch

from metaprox.config import ConfigError
from metaprox.tasks.episodes import EpisodeSampler
from metaprox.tasks.fewshot import FewShotTasks
from metaprox.tasks.share import TaskShare
from metaprox.tasks.task import KindedTasks, Task

__all__ = ["MixedWayTasks", "kind_names"]


def kind_names(ways: list[int]) -> dict[str, int]:
    """``{"5way": 5, "20way": 20}`` for ``ways = [5, 20]`` (the kinds' names, in order)."""
    return {f"{int(w)}way": int(w) for w in ways}


class MixedWayTasks(FewShotTasks):
    """Episodes of every way of ``heads.ways`` in each minibatch (see module doc)."""

    def __init__(self, cfg: dict[str, Any]):
        self.kinds = kind_names(cfg["heads"]["ways"])
        self._loaded: dict[str, Any] = {}  # each split read once, shared by the kinds' samplers
        super().__init__({**cfg, "task": {**cfg["task"], "ways": min(self.kinds.values())}})
        t = cfg["task"]
        images, classes = self.load("train")
        self.samplers = {k: EpisodeSampler(images, classes, w, self.train_shots, int(t["queries"]),
                                           rotations=bool(t["rotations"]), device=self.device)
                         for k, w in self.kinds.items()}

    def load(self, split: str) -> Any:
        if split not in self._loaded:
            self._loaded[split] = super().load(split)
        return self._loaded[split]

    def train_kinds(self, n: int) -> list[str]:
        """The kind of each task of a minibatch of ``n``."""
        names = list(self.kinds)
        return [names[i % len(names)] for i in range(n)]

    def train_batch(self, n: int, generator: torch.Generator) -> KindedTasks:
        kinds = self.train_kinds(n)
        out: list[Task | None] = [None] * n
        for k, sampler in self.samplers.items():
            at = [i for i, kd in enumerate(kinds) if kd == k]
            if at:
                for i, task in zip(at, sampler.sample_batch(len(at), generator).tasks(), strict=True):
                    out[i] = task
        return KindedTasks(out, kinds)

    def train_share(self, n: int, generator: torch.Generator, part: slice) -> TaskShare:
        raise ConfigError("multi-head runs (heads.ways) train in one process: MultiHeadMMP has no distributed "
                          "reduction; launch without torchrun.")

    builds_parts = False  # each kind draws its own episodes: evaluated whole

    def eval_sets(self, split: str, part: slice | None = None) -> dict[str, list[Task]]:
        if part is not None:
            raise ValueError("mixed-way evaluation sets are built whole (builds_parts = False).")
        e, t = self.cfg["eval"], self.cfg["task"]
        seed = e["seed"] if split == "test" else e["val_seed"]
        images, classes = self.load(split)
        out = {}
        for k, w in self.kinds.items():  # each kind's tasks from its own seed: independent of the kinds' order
            sampler = EpisodeSampler(images, classes, w, self.shots, int(t["eval_queries"]), rotations=False,
                                     device=self.device)
            out[k] = sampler.sample_batch(e["tasks"], torch.Generator().manual_seed(seed * 1000 + w)).tasks()
        return out
