"""LabelledImages validation and helpers; area resize; data root resolution."""

from __future__ import annotations

import numpy as np
import pytest

from metaprox.data import DatasetLayoutError, LabelledImages, data_root, resize_area


def test_validation_and_subset():
    imgs = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2)
    d = LabelledImages(imgs, np.array([0, 1, 2, 0, 1, 2]), ["a", "b", "c"], {"split": ["x", "y", "x"]})
    assert d.image_shape == (1, 2, 2) and d.num_classes == 3 and d.classes_where("split", "x") == [0, 2]
    sub = d.subset([2, 0])
    assert sub.class_names == ["c", "a"] and sub.class_meta["split"] == ["x", "x"]
    assert sorted(sub.labels.tolist()) == [0, 0, 1, 1] and np.array_equal(
        sub.images[sub.labels == 1], imgs[[0, 3]]
    )
    with pytest.raises(ValueError, match="labels span"):
        LabelledImages(imgs, np.array([0, 1, 2, 0, 1, 3]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="class_meta"):
        LabelledImages(imgs, np.zeros(6, dtype=int), ["a"], {"split": ["x", "y"]})
    with pytest.raises(KeyError, match="not found"):
        d.class_ids(["zz"])


def test_resize_area_is_box_average():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out = resize_area(img, 2)
    assert out.shape == (1, 2, 2) and out[0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)


def test_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("METAPROX_DATA", raising=False)
    with pytest.raises(DatasetLayoutError, match="METAPROX_DATA"):
        data_root("omniglot")
    monkeypatch.setenv("METAPROX_DATA", str(tmp_path))
    assert data_root("omniglot") == tmp_path / "omniglot"
    assert data_root("omniglot", tmp_path / "x") == tmp_path / "x"
