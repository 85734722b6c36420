"""EpisodeSampler: shapes, determinism, disjoint support/query, label ↔ class consistency, rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaprox.data import LabelledImages
from metaprox.tasks.episodes import EpisodeSampler

torch.set_num_threads(1)


def _dataset(num_classes: int = 6, per_class: int = 5, side: int = 6) -> LabelledImages:
    """Image i has pixel (0, 0) = class + 1 and pixel (0, 1) = i + 1 (an identity), the rest 0."""
    n = num_classes * per_class
    images = np.zeros((n, side, side), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class)
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)  # rows not sorted by class
    images, labels = images[perm], labels[perm]
    images[:, 0, 0] = labels + 1
    images[:, 0, 1] = np.arange(n) + 1
    return LabelledImages(images, labels, [f"c{k}" for k in range(num_classes)])


def test_shapes_dtypes_and_labels():
    s = EpisodeSampler(_dataset(), None, ways=3, shots=2, queries=3)
    batch = s.sample_batch(4, torch.Generator().manual_seed(0))
    assert batch.x.shape == (4, 6, 1, 6, 6) and batch.x_query.shape == (4, 9, 1, 6, 6)
    assert batch.x.dtype == torch.float32 and float(batch.x.max()) <= 1.0
    assert batch.y.dtype == torch.int64 and batch.y[0].tolist() == [0, 0, 1, 1, 2, 2]
    tasks = s.sample(2, torch.Generator().manual_seed(0))
    assert len(tasks) == 2 and tasks[0].x_query.shape == (9, 1, 6, 6)
    assert EpisodeSampler(_dataset(), None, 2, 1, 0).sample(1)[0].x_query is None


def test_deterministic_given_generator():
    s = EpisodeSampler(_dataset(), None, ways=3, shots=1, queries=2, rotations=True)
    a = s.sample_batch(5, torch.Generator().manual_seed(7))
    b = s.sample_batch(5, torch.Generator().manual_seed(7))
    c = s.sample_batch(5, torch.Generator().manual_seed(8))
    assert (
        torch.equal(a.x, b.x) and torch.equal(a.x_query, b.x_query) and torch.equal(a.classes, b.classes)
    )
    assert not torch.equal(a.x, c.x)


def test_no_leakage_and_consistent_labels():
    data = _dataset()
    s = EpisodeSampler(data, [0, 2, 3, 5], ways=3, shots=2, queries=3)
    batch = s.sample_batch(20, torch.Generator().manual_seed(0))
    for t in range(20):
        sup_ids = set((batch.x[t, :, 0, 0, 1] * 255).round().int().tolist())
        qry_ids = set((batch.x_query[t, :, 0, 0, 1] * 255).round().int().tolist())
        assert len(sup_ids) == 6 and len(qry_ids) == 9 and not sup_ids & qry_ids
        cls_s = (batch.x[t, :, 0, 0, 0] * 255).round().int() - 1
        cls_q = (batch.x_query[t, :, 0, 0, 0] * 255).round().int() - 1
        for label in range(3):
            classes = set(cls_s[batch.y[t] == label].tolist()) | set(
                cls_q[batch.y_query[t] == label].tolist()
            )
            assert len(classes) == 1 and classes <= {0, 2, 3, 5}
        assert len(set(cls_s.tolist())) == 3


def test_rotation_classes():
    data = _dataset(num_classes=2, per_class=3)
    s = EpisodeSampler(data, None, ways=8, shots=1, queries=2, rotations=True)
    assert s.num_classes == 8
    batch = s.sample_batch(3, torch.Generator().manual_seed(0))
    for t in range(3):
        assert sorted(batch.classes[t].tolist()) == list(range(8))
        for way in range(8):
            turns = int(batch.classes[t, way]) % 4
            img = torch.rot90(batch.x[t, way], -turns, dims=(-2, -1))  # undo the rotation
            assert img[0, 0, 0] > 0 and img[0, 0, 1] > 0  # marker pixels back in the top-left corner


def test_errors():
    data = _dataset(num_classes=3, per_class=4)
    with pytest.raises(ValueError, match="fewer than shots"):
        EpisodeSampler(data, None, ways=2, shots=3, queries=2)
    with pytest.raises(ValueError, match="need ≥ 4 classes"):
        EpisodeSampler(data, None, ways=4, shots=1)
    with pytest.raises(ValueError, match="duplicates"):
        EpisodeSampler(data, [0, 0], ways=1, shots=1)
