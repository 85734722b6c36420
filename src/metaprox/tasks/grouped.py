"""Few-shot episodes drawn within one group of classes (``task.group_by = "alphabet"``): the group is the task's
node in a tree prior over the task stream (``prior.kind = "tree"``; :class:`~metaprox.priors.TreePrior`).

Each episode picks a group uniformly at random, then ``ways`` of that group's classes (one
:class:`~metaprox.tasks.episodes.EpisodeSampler` per group, all from one generator). A minibatch is a
:class:`GroupedTasks`: :meth:`MetaLearner.step <metaprox.algorithms.base.MetaLearner.step>` reads each task's
node from it, and evaluation adapts each task from its node's center — a group seen in training — or from the
deepest seen ancestor (the root for an unseen group) with the marginal pull (:meth:`TreePrior.prior`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from metaprox.config import ConfigError
from metaprox.tasks.episodes import EpisodeSampler
from metaprox.tasks.fewshot import FewShotTasks
from metaprox.tasks.share import TaskShare
from metaprox.tasks.task import Task

__all__ = ["GroupedTasks", "GroupEpisodes", "class_groups", "GroupedFewShotTasks"]


class GroupedTasks(list):
    """A minibatch of tasks that knows each task's group (its node in a tree prior): ``GroupedTasks(tasks,
    groups)``."""

    def __init__(self, tasks: Any, groups: Sequence[str]):
        super().__init__(tasks)
        self.groups = [str(g) for g in groups]
        if len(self.groups) != len(self):
            raise ValueError(f"got {len(self.groups)} groups for {len(self)} tasks.")


def class_groups(images: Any, classes: Sequence[int], key: str) -> dict[str, list[int]]:
    """``{group: class ids}`` of ``classes`` by the class metadata ``key`` (e.g. Omniglot's ``alphabet``)."""
    meta = getattr(images, "class_meta", {})
    if key not in meta:
        raise ConfigError(f"task.group_by = {key!r}: the dataset has no such class metadata; available: "
                          f"{sorted(meta)}.")
    out: dict[str, list[int]] = {}
    for c in classes:
        out.setdefault(str(meta[key][c]), []).append(int(c))
    return out


class GroupEpisodes:
    """Episodes within one group: the group uniformly at random, then its classes (groups with fewer than
    ``ways`` classes are dropped; ``names`` are the kept ones, sorted)."""

    def __init__(self, images: Any, groups: Mapping[str, Sequence[int]], ways: int, shots: int, queries: int,
                 rotations: bool = False, device: torch.device | str = "cpu"):
        per = 4 if rotations else 1  # each rotation is a class of its own
        self.names = sorted(g for g, cs in groups.items() if len(cs) * per >= ways)
        if not self.names:
            raise ConfigError(f"no group has the {ways} classes a {ways}-way episode needs (largest: "
                              f"{max((len(c) * per for c in groups.values()), default=0)}); lower task.ways.")
        self.samplers = {g: EpisodeSampler(images, list(groups[g]), ways, shots, queries, rotations=rotations,
                                           device=device) for g in self.names}

    def sample(self, n: int, generator: torch.Generator) -> GroupedTasks:
        picks = torch.randint(len(self.names), (n,), generator=generator).tolist()
        tasks = [self.samplers[self.names[i]].sample_batch(1, generator).tasks()[0] for i in picks]
        return GroupedTasks(tasks, [self.names[i] for i in picks])


class GroupedFewShotTasks(FewShotTasks):
    """``task.group_by``: training and evaluation episodes within one group (see module doc)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.key = cfg["task"]["group_by"]
        self.train_groups = self._episodes("train", self.train_shots, int(cfg["task"]["queries"]),
                                           bool(cfg["task"]["rotations"]))
        self._eval_groups: dict[str, GroupEpisodes] = {}

    def _episodes(self, split: str, shots: int, queries: int, rotations: bool) -> GroupEpisodes:
        images, classes = self.load(split)
        classes = range(images.num_classes) if classes is None else classes
        return GroupEpisodes(images, class_groups(images, classes, self.key), self.ways, shots, queries,
                             rotations=rotations, device=self.device)

    def train_batch(self, n: int, generator: torch.Generator) -> list[Task]:
        return self.train_groups.sample(n, generator)

    def train_share(self, n: int, generator: torch.Generator, part: slice) -> TaskShare:
        raise ConfigError("task.group_by runs in one process (the tree's nodes are not split over ranks); launch "
                          "without torchrun.")

    builds_parts = False  # episodes come group by group from one generator: evaluated whole

    def eval_sets(self, split: str, part: slice | None = None) -> dict[str, list[Task]]:
        if part is not None:
            raise ValueError("grouped evaluation sets are built whole (builds_parts = False).")
        e = self.cfg["eval"]
        if split not in self._eval_groups:
            self._eval_groups[split] = self._episodes(split, self.shots, int(self.cfg["task"]["eval_queries"]),
                                                      False)
        g = torch.Generator().manual_seed(e["seed"] if split == "test" else e["val_seed"])
        return {f"{self.ways}-way {self.shots}-shot": self._eval_groups[split].sample(e["tasks"], g)}
