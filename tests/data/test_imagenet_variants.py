"""miniImageNet (CSV + images/, npz) and tieredImageNet (hierarchy CSV + class folders, npz) readers."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from metaprox.data import (
    DatasetLayoutError,
    class_hierarchy,
    load_miniimagenet_npz,
    load_tieredimagenet_npz,
    read_miniimagenet,
    read_tieredimagenet,
)


def _png(path: Path, value: float, side: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((side, side, 3), dtype=np.float32)
    img[..., 0] = value
    mpimg.imsave(path, img)


def test_miniimagenet_csv(tmp_path):
    rows = {
        "train": [
            ("n01000001_1.png", "n01000001"),
            ("n01000001_2.png", "n01000001"),
            ("n02000002_1.png", "n02000002"),
        ],
        "val": [("n03000003_1.png", "n03000003")],
    }
    for split, items in rows.items():
        (tmp_path / f"{split}.csv").write_text(
            "filename,label\n" + "".join(f"{f},{c}\n" for f, c in items)
        )
        for i, (f, _) in enumerate(items):
            _png(tmp_path / "images" / f, 0.2 * (i + 1))
    d = read_miniimagenet(tmp_path, ["train", "val"], size=4)
    assert d.images.shape == (4, 3, 4, 4) and d.class_names == ["n01000001", "n02000002", "n03000003"]
    assert d.labels.tolist() == [0, 0, 1, 2] and d.class_meta["split"] == ["train", "train", "val"]
    assert abs(int(d.images[1, 0, 0, 0]) - round(0.4 * 255)) <= 1 and d.images[1, 1].max() == 0
    (tmp_path / "test.csv").write_text("image,label\n")
    with pytest.raises(DatasetLayoutError, match="header"):
        read_miniimagenet(tmp_path, "test")
    (tmp_path / "test.csv").write_text("filename,label\nmissing.png,n09\n")
    with pytest.raises(DatasetLayoutError, match="missing.png"):
        read_miniimagenet(tmp_path, "test")


def test_miniimagenet_npz(tmp_path):
    np.savez(
        tmp_path / "train.npz",
        images=np.zeros((4, 6, 6, 3), dtype=np.uint8),
        labels=np.array([5, 5, 7, 9]),
        class_names=np.array([f"n{i}" for i in range(10)]),
    )
    d = load_miniimagenet_npz(tmp_path / "train.npz")
    assert (
        d.images.shape == (4, 3, 6, 6)
        and d.class_names == ["n5", "n7", "n9"]
        and d.labels.tolist() == [0, 0, 1, 2]
    )


def test_tieredimagenet(tmp_path):
    (tmp_path / "train.csv").write_text("specific,general\nn01,g1\nn02,g1\nn03,g2\n")
    for c in ("n01", "n02", "n03"):
        for i in range(2):
            _png(tmp_path / "train" / c / f"{i}.png", 0.5)
    d = read_tieredimagenet(tmp_path, "train", size=4)
    assert d.images.shape == (6, 3, 4, 4)
    assert class_hierarchy(d) == {"n01": "g1", "n02": "g1", "n03": "g2"}
    (tmp_path / "val.csv").write_text("n04,g3\n")
    with pytest.raises(DatasetLayoutError, match="class folder"):
        read_tieredimagenet(tmp_path, "val")
    np.savez(
        tmp_path / "t.npz",
        images=np.zeros((3, 3, 5, 5), dtype=np.uint8),
        labels=np.array([0, 1, 1]),
        label_general=np.array([0, 1, 1]),
        general_names=np.array(["ga", "gb"]),
    )
    t = load_tieredimagenet_npz(tmp_path / "t.npz", "test")
    assert class_hierarchy(t) == {"0": "ga", "1": "gb"} and t.class_meta["split"] == ["test", "test"]
