"""The miniImageNet reader's decoded-image cache on a generated fixture in exactly the standard layout: decoding,
reuse without decoding, rebuild when a source changes, the process pool, and the errors for a damaged folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_miniimagenet import class_colour, make_miniimagenet, wnid
from metaprox.data import DatasetLayoutError, image_cache, read_miniimagenet
from metaprox.tasks.episodes import EpisodeSampler


@pytest.fixture
def root(tmp_path) -> Path:
    make_miniimagenet(tmp_path / "mini")
    return tmp_path / "mini"


def _cached_files(cache: Path, split: str = "train") -> list[Path]:
    return sorted((cache / "miniimagenet").glob(f"{split}-*.npy"))


def test_reads_every_split_and_decodes_the_pixels(root, tmp_path):
    cache = tmp_path / "cache"
    seen = set()
    for split, first_class in (("train", 0), ("val", 4), ("test", 6)):
        d = read_miniimagenet(root, split, size=12, cache_dir=cache, workers=1)
        assert d.images.shape == (len(d.labels), 3, 12, 12) and d.images.dtype == np.uint8
        assert d.class_names == [wnid(k) for k in range(first_class, first_class + d.num_classes)]
        assert np.bincount(d.labels).tolist() == [6] * d.num_classes
        for k in range(d.num_classes):  # colour + noise in [-6, 6], then JPEG round-off
            mean = d.images[d.labels == k].reshape(-1, 3, 144).mean(axis=(0, 2))
            assert np.abs(mean - class_colour(first_class + k)).max() < 4
        seen.add(split)
    assert {p.name.split("-")[0] for p in (cache / "miniimagenet").iterdir()} == seen
    assert not any(p.name.startswith(".") for p in (cache / "miniimagenet").iterdir())  # no temporary left


def test_second_read_maps_the_cache_without_decoding(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = np.array(read_miniimagenet(root, "train", size=12, cache_dir=cache, workers=1).images)

    def refuse(*args):
        raise AssertionError("decoded again although the sources did not change")

    monkeypatch.setattr(image_cache, "_decode_one", refuse)
    again = read_miniimagenet(root, "train", size=12, cache_dir=cache, workers=1)
    assert isinstance(again.images, np.memmap) or isinstance(again.images.base, np.memmap)
    np.testing.assert_array_equal(again.images, first)


def test_a_changed_image_or_csv_rebuilds_the_cache(root, tmp_path):
    from PIL import Image

    cache = tmp_path / "cache"
    before = np.array(read_miniimagenet(root, "train", size=12, cache_dir=cache, workers=1).images)
    old_file = _cached_files(cache)
    name = f"{wnid(0)}{1:08d}.jpg"
    Image.fromarray(np.full((12, 12, 3), 7, dtype=np.uint8)).save(root / "images" / name, quality=95)
    st = os.stat(root / "images" / name)
    os.utime(root / "images" / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, surely
    after = read_miniimagenet(root, "train", size=12, cache_dir=cache, workers=1)
    assert np.abs(after.images[0].astype(int) - 7).max() <= 2  # the new pixels, not the cached ones
    np.testing.assert_array_equal(after.images[1:], before[1:])
    new_file = _cached_files(cache)
    assert len(new_file) == 1 and new_file != old_file  # the stale array is removed

    csv = root / "train.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")  # drop the last row
    shorter = read_miniimagenet(root, "train", size=12, cache_dir=cache, workers=1)
    assert len(shorter) == len(after) - 1 and _cached_files(cache) not in (old_file, new_file)


def test_the_process_pool_decodes_the_same_array(root, tmp_path, monkeypatch):
    serial = read_miniimagenet(root, "train", size=12, cache_dir=tmp_path / "serial", workers=1).images
    monkeypatch.setattr(image_cache, "_CHUNK", 5)  # 24 files → 5 jobs over 2 processes
    pooled = read_miniimagenet(root, "train", size=12, cache_dir=tmp_path / "pool", workers=2).images
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(serial))


def test_resizes_to_the_requested_size(root, tmp_path):
    d = read_miniimagenet(root, "val", size=6, cache_dir=tmp_path / "cache", workers=1)
    assert d.images.shape == (12, 3, 6, 6)
    assert np.abs(d.images[:6].reshape(6, 3, -1).mean(axis=(0, 2)) - class_colour(4)).max() < 4


def test_truncated_jpeg_is_named_and_leaves_no_cache_file(root, tmp_path):
    cache = tmp_path / "cache"
    bad = root / "images" / f"{wnid(1)}{3:08d}.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetLayoutError, match=f"{bad.name}.*(truncated|damaged)"):
        read_miniimagenet(root, "train", size=12, cache_dir=cache, workers=1)
    assert list((cache / "miniimagenet").iterdir()) == []  # neither a final nor a temporary file


def test_csv_row_naming_a_missing_file(root, tmp_path):
    (root / "images" / f"{wnid(6)}{2:08d}.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=rf"1 of 12 listed image files do not exist.*{wnid(6)}00000002"):
        read_miniimagenet(root, "test", size=12, cache_dir=tmp_path / "cache", workers=1)


def test_duplicated_row_is_refused_with_both_lines(root, tmp_path):
    csv = root / "val.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines + [lines[3]]) + "\n")
    with pytest.raises(DatasetLayoutError, match=rf"{lines[3].split(',')[0]} is listed twice \(val.csv line 4 and "
                                                 rf"val.csv line {len(lines) + 1}\)"):
        read_miniimagenet(root, "val", size=12, cache_dir=tmp_path / "cache", workers=1)


def test_missing_or_partial_folder(root, tmp_path):
    with pytest.raises(DatasetLayoutError, match="no folder at"):
        read_miniimagenet(tmp_path / "nowhere", "train", cache_dir=tmp_path / "cache")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(root / "train.csv", partial / "train.csv")
    with pytest.raises(DatasetLayoutError, match="no images/ folder"):
        read_miniimagenet(partial, "train", cache_dir=tmp_path / "cache")
    (partial / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match="no val.csv"):
        read_miniimagenet(partial, "val", cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetLayoutError, match="24 of 24 listed image files do not exist"):
        read_miniimagenet(partial, "train", cache_dir=tmp_path / "cache")


def test_episodes_index_the_mapped_cache(root, tmp_path):
    d = read_miniimagenet(root, "train", size=12, cache_dir=tmp_path / "cache", workers=1)
    sampler = EpisodeSampler(d, None, ways=3, shots=2, queries=1)
    assert np.shares_memory(sampler.data.numpy(), d.images)  # no copy of the mapped array
    batch = sampler.sample_batch(4, torch.Generator().manual_seed(0))
    assert batch.x.shape == (4, 6, 3, 12, 12) and batch.x_query.shape == (4, 3, 3, 12, 12)
    for t in range(4):  # every image shows the colour of the class it is labelled with
        for x, y in ((batch.x[t], batch.y[t]), (batch.x_query[t], batch.y_query[t])):
            colour = torch.as_tensor(np.stack([class_colour(int(k)) for k in batch.classes[t][y]])).float() / 255
            assert (x.mean((-2, -1)) - colour).abs().max() < 4 / 255


def test_cache_dir_true_means_the_default_cache_folder(root, tmp_path, monkeypatch):
    monkeypatch.setenv(image_cache.CACHE_ENV_VAR, str(tmp_path / "default"))  # (was Path(True): a TypeError)
    d = read_miniimagenet(root, "val", size=6, cache_dir=True, workers=1)
    assert d.images.shape[-2:] == (6, 6) and _cached_files(tmp_path / "default", "val")
