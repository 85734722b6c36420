"""N-way K-shot episodes from :class:`~metaprox.data.LabelledImages`: the few-shot classification tasks.

An episode draws ``ways`` distinct classes and, per class, ``shots + queries`` distinct images; support labels
are ``0..ways−1`` in draw order (so label ↔ class is random per episode). Images become float32 in [0, 1]
(uint8 / 255; Omniglot readers store ink = 255, so ink = 1). With ``rotations=True`` every class also appears
rotated by 90°, 180° and 270° as three further classes (the Omniglot convention, classes × 4).

Sampling is vectorised: a per-class index table is built once; classes and images are drawn with
``torch.rand`` + ``argsort`` from the given ``torch.Generator`` (deterministic), gathered with one
indexing op, and rotated with one ``torch.rot90`` per rotation angle — no Python loop over images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metaprox.tasks.share import share_bounds
from metaprox.tasks.task import Task

__all__ = ["EpisodeSampler", "EpisodeBatch"]


@dataclass(frozen=True)
class EpisodeBatch:
    """``T`` episodes stacked: ``x`` (T, ways·shots, C, H, W), ``y`` (T, ways·shots), query likewise.

    ``classes`` (T, ways) are the drawn class ids of the sampler's class list (with rotations:
    ``base·4 + quarter_turns``).
    """

    x: torch.Tensor
    y: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    classes: torch.Tensor

    def tasks(self) -> list[Task]:
        if self.x_query.shape[1] == 0:  # no query images drawn: support-only tasks
            return [Task(self.x[t], self.y[t]) for t in range(self.x.shape[0])]
        return [
            Task(self.x[t], self.y[t], self.x_query[t], self.y_query[t]) for t in range(self.x.shape[0])
        ]


class EpisodeSampler:
    """Samples N-way K-shot classification tasks.

    Args:
        images: the dataset (any reader's :class:`LabelledImages`, or anything with ``images``, ``labels``).
        classes: class ids to draw from (e.g. ``images.classes_where("split", "background")``); None = all.
        ways: classes per episode. shots: support images per class. queries: query images per class (≥ 0).
        rotations: add the 90°/180°/270° rotations of every class as new classes (square images only).
        device: where the image table and the episodes live.

    Raises:
        ValueError: if fewer than ``ways`` classes are available or a class has fewer than ``shots + queries``
            images.
    """

    def __init__(
        self,
        images,
        classes: Sequence[int] | None,
        ways: int,
        shots: int,
        queries: int = 0,
        rotations: bool = False,
        device: torch.device | str = "cpu",
    ):
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(
                f"need ways ≥ 1, shots ≥ 1, queries ≥ 0; got ways={ways}, shots={shots}, "
                f"queries={queries}."
            )
        labels = np.asarray(images.labels, dtype=np.int64)
        num_classes = int(labels.max()) + 1 if labels.size else 0
        classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ValueError("classes contains duplicates; each class id may appear once.")
        if classes and (min(classes) < 0 or max(classes) >= num_classes):
            raise ValueError(
                f"class ids must lie in 0..{num_classes - 1}; got {min(classes)}..{max(classes)}."
            )
        per = shots + queries
        counts = (
            np.bincount(labels, minlength=num_classes)[classes]
            if classes
            else np.zeros(0, dtype=np.int64)
        )
        short = [c for c, k in zip(classes, counts, strict=True) if k < per]
        if short:
            raise ValueError(
                f"{len(short)} classes have fewer than shots + queries = {per} images (e.g. class "
                f"{short[0]} has {int(np.bincount(labels, minlength=num_classes)[short[0]])}); "
                f"lower shots/queries or drop those classes."
            )
        self.ways, self.shots, self.queries, self.rotations = (
            int(ways),
            int(shots),
            int(queries),
            bool(rotations),
        )
        self.num_classes = len(classes) * (4 if rotations else 1)
        if self.num_classes < ways:
            raise ValueError(
                f"{ways}-way episodes need ≥ {ways} classes, only {self.num_classes} available."
            )
        arr = np.asarray(images.images)
        if arr.ndim == 3:
            arr = arr[:, None]
        if rotations and arr.shape[-1] != arr.shape[-2]:
            raise ValueError(f"rotations need square images, got {arr.shape[-2]}×{arr.shape[-1]}.")
        # keep only the images of the chosen classes; table[k, j] = row of the j-th image of class k
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]])
        max_count = int(counts.max()) if len(counts) else 0
        rows = [
            order[starts[c] : starts[c] + n] for c, n in zip(classes, counts, strict=True)
        ]  # once per class, at build time
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # table[k, j] = row (in self.data) of the j-th image of class k; padded by repeating the last image
        table = offsets[:, None] + np.minimum(
            np.arange(max_count)[None, :], np.maximum(counts[:, None] - 1, 0)
        )
        self.device = torch.device(device)
        if flat.shape[0] == arr.shape[0] and np.array_equal(flat, np.arange(arr.shape[0])):
            kept = arr  # rows already grouped by class (e.g. a memory-mapped image cache): no copy on CPU
        else:
            kept = arr[flat]
        self.data = torch.as_tensor(kept).to(self.device)
        self.scale = 1.0 / 255.0 if self.data.dtype == torch.uint8 else 1.0
        self.table = torch.as_tensor(table, device=self.device)
        self.counts = torch.as_tensor(counts, device=self.device)
        self.classes = list(classes)

    # ---------------------------------------------------------------------------------------------------
    def sample_batch(self, num_tasks: int, generator: torch.Generator | None = None,
                     part: slice | None = None) -> EpisodeBatch:
        """``num_tasks`` episodes as stacked tensors (see :class:`EpisodeBatch`).

        ``part`` (a ``slice(lo, hi)``) builds only episodes ``lo..hi−1``: the random numbers of all ``num_tasks``
        are still drawn (cheap), so the generator ends in the same state and each built episode is bitwise the
        one the full draw gives; the sorting, gathering and rotating (the costly part) is done for the part only
        (rows are sorted independently).
        """
        t, w, s, q = int(num_tasks), self.ways, self.shots, self.queries
        if t < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}.")
        lo, hi = share_bounds(part, t)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u_classes = torch.rand(t, self.num_classes, generator=generator, device=gen_device)[lo:hi]
        u_images = torch.rand(t, w, self.table.shape[1], generator=generator, device=gen_device)[lo:hi]
        t = hi - lo
        drawn = u_classes.argsort(1)[:, :w]
        drawn = drawn.to(self.device)
        base = drawn // 4 if self.rotations else drawn
        count = self.counts[base]  # (t, w)
        keys = u_images.to(self.device).masked_fill(
            torch.arange(self.table.shape[1], device=self.device) >= count.unsqueeze(-1), 2.0
        )
        pick = keys.argsort(-1)[..., : s + q]  # (t, w, s + q): distinct images per class
        rows = torch.gather(self.table[base], 2, pick)
        x = self.data[rows]  # (t, w, s + q, C, H, W)
        x = x.float() * self.scale if self.scale != 1.0 else x.float()
        if self.rotations:
            turns = drawn % 4
            for r in (1, 2, 3):
                mask = turns == r
                if bool(mask.any()):
                    x[mask] = torch.rot90(x[mask], r, dims=(-2, -1))
        labels = torch.arange(w, device=self.device).view(1, w, 1)
        ys = labels.expand(t, w, s).reshape(t, w * s)
        yq = labels.expand(t, w, q).reshape(t, w * q)
        shape = x.shape[3:]
        return EpisodeBatch(
            x[:, :, :s].reshape(t, w * s, *shape), ys, x[:, :, s:].reshape(t, w * q, *shape), yq, drawn
        )

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> list[Task]:
        """``num_tasks`` episodes as :class:`metaprox.Task` (query set attached when ``queries > 0``)."""
        batch = self.sample_batch(num_tasks, generator)
        if self.queries == 0:
            return [Task(batch.x[i], batch.y[i]) for i in range(batch.x.shape[0])]
        return batch.tasks()
