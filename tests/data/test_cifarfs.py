"""CIFAR-FS / FC100 from the CIFAR-100 binary records (fixture files in exactly that format)."""

from __future__ import annotations

import numpy as np
import pytest

from metaprox.data import (
    CIFAR100_FINE_NAMES,
    CIFAR_FS_SPLITS,
    FC100_SPLITS,
    DatasetLayoutError,
    read_cifar100_binary,
    read_cifar_fs,
    read_fc100,
)
from metaprox.data.cifarfs import RECORD_BYTES


def _coarse_of(fine: int) -> int:
    return fine % 20  # fixture mapping: 5 fine classes per superclass


def _write_bins(root, per_class=(1, 1)):
    root.mkdir(parents=True, exist_ok=True)
    for fname, n in zip(("train.bin", "test.bin"), per_class, strict=True):
        recs = np.zeros((100 * n, RECORD_BYTES), dtype=np.uint8)
        fine = np.repeat(np.arange(100), n)
        recs[:, 0] = [_coarse_of(f) for f in fine]
        recs[:, 1] = fine
        recs[:, 2] = fine  # first red pixel = fine label
        recs[:, 2 + 1024] = 200  # first green pixel
        recs.tofile(root / fname)


def test_split_constants():
    assert {k: len(v) for k, v in CIFAR_FS_SPLITS.items()} == {"train": 64, "val": 16, "test": 20}
    assert sorted(sum(CIFAR_FS_SPLITS.values(), ())) == sorted(CIFAR100_FINE_NAMES)
    assert sorted(sum(FC100_SPLITS.values(), ())) == list(range(20))


def test_binary_records(tmp_path):
    _write_bins(tmp_path, (2, 1))
    d = read_cifar100_binary(tmp_path)
    assert d.images.shape == (300, 3, 32, 32) and d.num_classes == 100
    assert (
        d.images[0, 0, 0, 0] == d.labels[0] and d.images[0, 1, 0, 0] == 200 and d.images[0, 2, 0, 0] == 0
    )
    assert d.class_meta["coarse_id"][23] == 3


def test_cifar_fs_and_fc100(tmp_path):
    _write_bins(tmp_path)
    fs = read_cifar_fs(tmp_path, "test")
    assert fs.num_classes == 20 and fs.class_names == list(CIFAR_FS_SPLITS["test"]) and len(fs) == 40
    assert int(fs.images[fs.labels == 0][0, 0, 0, 0]) == CIFAR100_FINE_NAMES.index("baby")
    fc = read_fc100(tmp_path, "val")
    assert fc.num_classes == 20 and all(c in FC100_SPLITS["val"] for c in fc.class_meta["coarse_id"])
    (tmp_path / "mine.txt").write_text("apple\nworm\n")
    assert read_cifar_fs(tmp_path, "custom", split_file=tmp_path / "mine.txt").class_names == [
        "apple",
        "worm",
    ]


def test_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="train.bin"):
        read_cifar100_binary(tmp_path)
    (tmp_path / "train.bin").write_bytes(b"\0" * 100)
    (tmp_path / "test.bin").write_bytes(b"\0" * RECORD_BYTES)
    with pytest.raises(DatasetLayoutError, match="not a multiple"):
        read_cifar100_binary(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        read_cifar_fs(tmp_path, "bogus")
