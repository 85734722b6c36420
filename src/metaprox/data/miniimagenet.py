"""miniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) class split: CSV lists or arrays.

Folder layout (``root`` default ``$METAPROX_DATA/miniimagenet``)::

    train.csv  val.csv  test.csv      header "filename,label"; label = WordNet id (64 / 16 / 20 classes)
    images/<filename>                 the 84×84 JPEGs (reading JPEG needs Pillow)

Array layout (:func:`load_miniimagenet_npz`): one ``.npz`` per split with ``images`` uint8 ``(N, H, W, 3)`` or
``(N, 3, H, W)``, integer ``labels`` ``(N,)`` and optionally ``class_names`` (str, one per label value).
Result: RGB ``(N, 3, H, W)`` uint8, class names = WordNet ids, class metadata ``split``.

The CSV reader decodes the images once into a cache outside the data folder and memory-maps it afterwards
(:mod:`metaprox.data.image_cache`); it refuses a missing folder, a missing CSV, rows naming absent files, a file
listed twice and a damaged image, naming the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metaprox.data.labelled import DatasetLayoutError, LabelledImages, data_root, read_image, resize_area

__all__ = ["read_miniimagenet", "load_miniimagenet_npz", "read_split_csv", "read_split_rows",
           "load_rgb_folder_images"]

SPLITS = ("train", "val", "test")


def read_split_csv(path: Path, header: tuple[str, str] = ("filename", "label")) -> list[tuple[str, str]]:
    """Rows ``(filename, label)`` of a split CSV whose first line is the given header."""
    return [(f, label) for _, f, label in read_split_rows(path, header)]


def read_split_rows(path: Path, header: tuple[str, str] = ("filename", "label")) -> list[tuple[int, str, str]]:
    """Rows ``(line number, filename, label)`` of a split CSV whose first line is the given header."""
    if not path.is_file():
        raise DatasetLayoutError(
            f"expected the split file {path} (CSV with header '{','.join(header)}')."
        )
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(c.strip() for c in rows[0][:2]) != header:
        raise DatasetLayoutError(
            f"{path}: first line must be the header '{','.join(header)}', "
            f"got {rows[0] if rows else 'an empty file'}."
        )
    out = []
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) < 2:
            raise DatasetLayoutError(f"{path}:{n}: expected 'filename,label', got {row}.")
        out.append((n, row[0].strip(), row[1].strip()))
    return out


def load_rgb_folder_images(paths: Sequence[Path], size: int | None) -> np.ndarray:
    """Read RGB image files into ``(N, 3, size, size)`` uint8 (area-averaged when the size differs)."""
    out = np.empty((len(paths), 3, size, size) if size else (0,), dtype=np.uint8)
    batch = []
    for i, p in enumerate(paths):
        if not p.is_file():
            raise DatasetLayoutError(f"expected the image file {p}.")
        img = read_image(p, "RGB").transpose(2, 0, 1)
        if size is None:
            batch.append(img)
            continue
        if img.shape[1:] != (size, size):
            img = resize_area(img[None], size)[0]
        out[i] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if size is None:
        shapes = {b.shape for b in batch}
        if len(shapes) > 1:
            raise DatasetLayoutError(
                f"images have different sizes {sorted(shapes)[:3]}...; pass size=... to resize."
            )
        out = np.clip(np.rint(np.stack(batch) * 255.0), 0, 255).astype(np.uint8)
    return out


def _splits(split: str | Sequence[str]) -> list[str]:
    splits = [split] if isinstance(split, str) else list(split)
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; choose from {SPLITS}.")
    return splits


def _check_folder(base: Path, splits: Sequence[str]) -> None:
    if not base.is_dir():
        raise DatasetLayoutError(
            f"miniImageNet: no folder at {base}; expected images/ and train.csv, val.csv, test.csv there "
            f"(set task.data_path or $METAPROX_DATA/miniimagenet)."
        )
    if not (base / "images").is_dir():
        raise DatasetLayoutError(
            f"miniImageNet: {base} has no images/ folder (it holds {sorted(p.name for p in base.iterdir())[:6]}); "
            f"the dataset is incomplete — expected images/<filename> for every row of the split CSVs."
        )
    for s in splits:
        if not (base / f"{s}.csv").is_file():
            raise DatasetLayoutError(f"miniImageNet: {base} has no {s}.csv (the Ravi & Larochelle split list).")


def _check_unique(rows: list[tuple[str, str, int]]) -> None:
    """A file listed twice (in one split or across splits) would duplicate an image or leak it between splits."""
    seen: dict[str, tuple[str, int]] = {}
    for fname, csv_name, line in rows:
        if fname in seen:
            first = seen[fname]
            raise DatasetLayoutError(
                f"miniImageNet: {fname} is listed twice ({first[0]} line {first[1]} and {csv_name} line {line}); "
                f"remove the duplicated row."
            )
        seen[fname] = (csv_name, line)


def read_miniimagenet(
    root: str | os.PathLike | None = None, split: str | Sequence[str] = "train", size: int | None = 84,
    cache_dir: str | os.PathLike | None | bool = None, workers: int = 0,
) -> LabelledImages:
    """Read the Ravi & Larochelle CSV split(s) and the images they name (classes in first-seen order).

    The decoded images are cached (see :mod:`metaprox.data.image_cache`): the first call decodes the JPEGs
    (``workers`` processes, 0 = one per CPU) into ``cache_dir`` (default ``$METAPROX_CACHE`` or
    ``~/.cache/metaprox``); later calls memory-map the cached array. ``cache_dir=False`` or ``size=None`` (keep
    the files' own size) decode without a cache.
    """
    from metaprox.data.image_cache import cached_images

    base = data_root("miniimagenet", root)
    splits = _splits(split)
    _check_folder(base, splits)
    files: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    meta_split: list[str] = []
    rows: list[tuple[str, str, int]] = []
    index: dict[str, int] = {}
    source = b""
    for s in splits:
        source += (base / f"{s}.csv").read_bytes()
        for line, fname, wnid in read_split_rows(base / f"{s}.csv"):
            if wnid not in index:
                index[wnid] = len(names)
                names.append(wnid)
                meta_split.append(s)
            rows.append((fname, f"{s}.csv", line))
            files.append(base / "images" / fname)
            labels.append(index[wnid])
    if not files:
        raise DatasetLayoutError(f"miniImageNet: the split files under {base} list no images.")
    _check_unique(rows)
    if cache_dir is False or size is None:
        images = load_rgb_folder_images(files, size)
    else:
        where = None if isinstance(cache_dir, bool) else cache_dir or None  # True: the default cache folder
        images = cached_images("miniimagenet", "+".join(splits), files, int(size), source, where, workers)
    return LabelledImages(
        images, np.asarray(labels, dtype=np.int64), names, {"split": meta_split}, "miniimagenet"
    )


def load_miniimagenet_npz(path: str | os.PathLike, split: str | None = None) -> LabelledImages:
    """Load one split stored as arrays (``images``, ``labels``, optional ``class_names``); no pickle."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(
            f"expected the array file {path} (images (N, H, W, 3) uint8, labels (N,))."
        )
    with np.load(path, allow_pickle=False) as d:
        if "images" not in d.files or "labels" not in d.files:
            raise DatasetLayoutError(
                f"{path} must contain arrays 'images' and 'labels'; it has {d.files}."
            )
        images, labels = d["images"], d["labels"].astype(np.int64)
        raw_names = [str(n) for n in d["class_names"]] if "class_names" in d.files else None
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise DatasetLayoutError(
            f"{path}: images must be (N, H, W, 3) or (N, 3, H, W), got {images.shape}."
        )
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    values, labels = np.unique(labels, return_inverse=True)
    if raw_names is not None:
        if len(raw_names) <= int(values.max()):
            raise DatasetLayoutError(
                f"{path}: {len(raw_names)} class_names for label values up to {values.max()}."
            )
        names = [raw_names[v] for v in values]
    else:
        names = [str(v) for v in values]
    meta = {"split": [split or path.stem] * len(names)}
    return LabelledImages(images, labels.astype(np.int64), names, meta, "miniimagenet")
