"""Building only a share of a task minibatch: the tasks of ``part`` are bitwise those of the full draw and the
generator ends in the same state (sine, Omniglot-style episodes with rotations); TaskShare's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaprox import Task
from metaprox.data import LabelledImages
from metaprox.tasks.episodes import EpisodeSampler
from metaprox.tasks.share import TaskShare, share_bounds
from metaprox.tasks.sine import SineFamily

torch.set_num_threads(1)

B = 7
PARTS = [slice(0, 4), slice(4, 7), slice(3, 4), slice(6, 7), slice(2, 2), slice(0, 7)]


def _tensors(task: Task) -> list[torch.Tensor]:
    return [task.x, task.y] + ([task.x_query, task.y_query] if task.has_query else [])


def _same(a: list[Task], b: list[Task]) -> bool:
    return len(a) == len(b) and all(
        len(_tensors(s)) == len(_tensors(t))
        and all(torch.equal(u, v) for u, v in zip(_tensors(s), _tensors(t), strict=True))
        for s, t in zip(a, b, strict=True))


def _check(draw, part: slice) -> None:
    """``draw(generator, part)`` → tasks: the part equals the slice of the full draw, the generator agrees."""
    g_full, g_part = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    full, share = draw(g_full, None), draw(g_part, part)
    assert _same(share, full[part]), part
    assert torch.equal(g_full.get_state(), g_part.get_state())  # the next draw is the same too


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("query", [0, 4])
def test_sine_part_is_the_slice_of_the_full_draw(part, query):
    fam = SineFamily()
    _check(lambda g, p: fam.sample(B, 10, g, num_query=query, part=p), part)


def _images(num_classes: int = 5, side: int = 6) -> LabelledImages:
    """Classes with 3..7 random images each (unequal counts: the padded index table is exercised)."""
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(3 + k, k) for k in range(num_classes)])
    images = rng.integers(0, 256, (len(labels), side, side), dtype=np.uint8)
    return LabelledImages(images, labels, [f"c{k}" for k in range(num_classes)])


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("rotations,queries", [(True, 2), (False, 0)])
def test_episode_part_is_the_slice_of_the_full_draw(part, rotations, queries):
    s = EpisodeSampler(_images(), None, ways=3, shots=1, queries=queries, rotations=rotations)
    _check(lambda g, p: s.sample_batch(B, g, p).tasks(), part)
    full = s.sample_batch(B, torch.Generator().manual_seed(3))
    assert torch.equal(s.sample_batch(B, torch.Generator().manual_seed(3), part).classes, full.classes[part])


def test_bad_parts_are_refused():
    with pytest.raises(ValueError, match="does not lie within"):
        share_bounds(slice(2, 9), 7)
    with pytest.raises(ValueError, match="contiguous"):
        share_bounds(slice(0, 6, 2), 7)
    with pytest.raises(ValueError, match="does not lie within"):
        SineFamily().sample(4, 5, torch.Generator(), part=slice(3, 2))


def test_task_share_knows_the_global_batch():
    tasks = SineFamily().sample(5, 10, torch.Generator().manual_seed(0), num_query=3)
    tasks[4] = Task(torch.zeros(12, 1), torch.zeros(12, 1))  # bigger, and without a query set
    share = TaskShare.of(tasks, slice(1, 3))
    assert share.tasks == tasks[1:3] and share.part == slice(1, 3) and share.total == 5
    assert share.lacking_query == 1
    assert share.max_examples(with_query=False) == 12 and share.max_examples(with_query=True) == 13
    with pytest.raises(ValueError, match="example counts of tasks \\[1, 3\\)"):
        TaskShare(tasks[1:3], 5, 1, [(10, 3), (10, 0), (10, 3), (10, 3), (12, 0)])  # task 2 has a query set
    with pytest.raises(ValueError, match="entries for a minibatch of 5"):
        TaskShare(tasks[:2], 5, 0, [(10, 3)] * 4)
    with pytest.raises(ValueError, match="does not lie within"):
        TaskShare.uniform(tasks[:2], 5, slice(4, 6), 10, 3)
    with pytest.raises(TypeError, match="metaprox.Task"):
        TaskShare.of([tasks[0], "not a task"], slice(0, 1))
