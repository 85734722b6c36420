"""Few-shot image classification as a task family of a run: dataset + class split → episode samplers.

``task.family = "fewshot"`` with ``task.dataset`` one of ``omniglot`` (compact ``omniglot28.npz`` or the official
PNG folders), ``miniimagenet`` (``.npz`` arrays or split CSVs + images), ``cifar_fs`` / ``fc100`` (CIFAR-100
binary release). The data location is ``task.data_path``, else ``$METAPROX_DATA/<dataset>``.

Class splits: ``task.split = "vinyals"`` (Omniglot: the Vinyals et al. train/val/test lists, rotations included as
classes), ``"background"`` (Omniglot: background alphabets for training — the last ``task.val_alphabets``
background alphabets held out for validation — and evaluation alphabets for test), or ``"standard"`` (the
dataset's own train/val/test splits).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from metaprox.config import ConfigError
from metaprox.tasks.episodes import EpisodeSampler
from metaprox.tasks.share import TaskShare
from metaprox.tasks.task import Task

__all__ = ["FewShotTasks", "load_split"]


def _root(cfg_path: str | None, dataset: str) -> Path:
    if cfg_path:
        return Path(cfg_path)
    env = os.environ.get("METAPROX_DATA")
    if not env:
        raise ConfigError(f"task.data_path is not set and $METAPROX_DATA is empty: say where the {dataset} data "
                          f"lie (e.g. --set task.data_path=\"../shared/data/omniglot\").")
    return Path(env) / dataset


def load_split(dataset: str, root: Path, split_scheme: str, which: str, val_alphabets: int = 5,
               cache_dir: str | None = None, decode_workers: int = 0):
    """(images, class ids) of one split (``train``/``val``/``test``) of a dataset.

    miniImageNet from CSVs + JPEGs is decoded once into an image cache (``cache_dir``, default ``$METAPROX_CACHE``
    or ``~/.cache/metaprox``) with ``decode_workers`` processes (0: one per CPU); see
    :mod:`metaprox.data.image_cache`.
    """
    from metaprox.data import omniglot

    if dataset == "omniglot":
        npz = root / "omniglot28.npz" if root.is_dir() else root
        if npz.is_file():
            images = omniglot.load_omniglot_npz(npz)
        else:
            images = omniglot.read_omniglot_folders(root)
        if split_scheme == "vinyals":
            lists = root if root.is_dir() else root.parent
            return omniglot.vinyals_split(images, which, root=lists), None
        if split_scheme == "background":
            bg = [c for c in range(images.num_classes) if images.class_meta["split"][c] == "background"]
            ev = [c for c in range(images.num_classes) if images.class_meta["split"][c] != "background"]
            alphabets = sorted({images.class_meta["alphabet"][c] for c in bg})
            held = set(alphabets[-val_alphabets:]) if val_alphabets else set()
            if which == "train":
                return images, [c for c in bg if images.class_meta["alphabet"][c] not in held]
            if which == "val":
                return images, [c for c in bg if images.class_meta["alphabet"][c] in held]
            return images, ev
        raise ConfigError(f"task.split = {split_scheme!r} for omniglot: use 'vinyals' or 'background'.")
    if split_scheme != "standard":
        raise ConfigError(f"task.split = {split_scheme!r} for {dataset}: use 'standard'.")
    if dataset == "miniimagenet":
        from metaprox.data.miniimagenet import load_miniimagenet_npz, read_miniimagenet

        npz = root / f"{which}.npz" if root.is_dir() else root
        if npz.is_file():
            return load_miniimagenet_npz(npz, which), None
        return read_miniimagenet(root, which, cache_dir=cache_dir, workers=decode_workers), None
    if dataset == "tieredimagenet":
        from metaprox.data.tieredimagenet import load_tieredimagenet_npz, read_tieredimagenet

        npz = root / f"{which}.npz" if root.is_dir() else root
        return (load_tieredimagenet_npz(npz, which) if npz.is_file() else read_tieredimagenet(root, which)), None
    if dataset in ("cifar_fs", "fc100"):
        from metaprox.data.cifarfs import read_cifar_fs, read_fc100

        return (read_cifar_fs(root, which) if dataset == "cifar_fs" else read_fc100(root, which)), None
    raise ConfigError(f"unknown task.dataset {dataset!r}; choose omniglot, miniimagenet, tieredimagenet, "
                      f"cifar_fs or fc100.")


class FewShotTasks:
    """N-way K-shot episodes of a run: training episodes (``train_shots`` support + ``queries`` query images
    per class) and evaluation episodes (``shots`` support + ``eval_queries`` query images per class)."""

    def __init__(self, cfg: dict[str, Any]):
        t = cfg["task"]
        self.cfg, self.dataset = cfg, t["dataset"]
        self.root = _root(t["data_path"], self.dataset)
        self.device = cfg["device"]
        self.ways, self.shots = int(t["ways"]), int(t["shots"])
        self.train_shots = int(t["train_shots"] or t["shots"])
        images, classes = self.load("train")
        self.train = EpisodeSampler(images, classes, self.ways, self.train_shots, int(t["queries"]),
                                    rotations=bool(t["rotations"]), device=self.device)
        self._eval: dict[str, EpisodeSampler] = {}

    def load(self, split: str):
        """(images, class ids) of one split of this run's dataset."""
        t = self.cfg["task"]
        return load_split(self.dataset, self.root, t["split"], split, t["val_alphabets"], t["cache_dir"],
                          int(t["decode_workers"]))

    def eval_sampler(self, split: str) -> EpisodeSampler:
        if split not in self._eval:
            t = self.cfg["task"]
            images, classes = self.load(split)
            self._eval[split] = EpisodeSampler(images, classes, self.ways, self.shots, int(t["eval_queries"]),
                                               rotations=False, device=self.device)
        return self._eval[split]

    def train_batch(self, n: int, generator: torch.Generator) -> list[Task]:
        return self.train.sample_batch(n, generator).tasks()

    def train_share(self, n: int, generator: torch.Generator, part: slice) -> TaskShare:
        """Episodes ``part`` of the minibatch ``train_batch(n, generator)`` draws, built alone (same generator use)."""
        tasks = self.train.sample_batch(n, generator, part).tasks()
        return TaskShare.uniform(tasks, n, part, self.ways * self.train_shots, self.ways * self.train.queries)

    #: eval_sets builds any part of its episodes alone (evaluate_run adapts large sets part by part)
    builds_parts = True

    def eval_sets(self, split: str, part: slice | None = None) -> dict[str, list[Task]]:
        """The ``eval.tasks`` episodes of ``split`` (``part``: only episodes lo..hi−1 of them, bitwise the same)."""
        e = self.cfg["eval"]
        seed = e["seed"] if split == "test" else e["val_seed"]
        g = torch.Generator().manual_seed(seed)
        batch = self.eval_sampler(split).sample_batch(e["tasks"], g, part)
        return {f"{self.ways}-way {self.shots}-shot": batch.tasks()}
