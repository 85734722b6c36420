"""tieredImageNet (Ren et al. 2018): 608 specific classes in 34 general categories, split by category.

Folder layout (``root`` default ``$METAPROX_DATA/tieredimagenet``)::

    train.csv  val.csv  test.csv      one "specific,general" pair per line (WordNet ids; an optional header
                                      line "specific,general"): the class hierarchy of the split
    train/<specific>/*.jpg|*.jpeg|*.png   (likewise val/, test/) the images of each specific class

Array layout (:func:`load_tieredimagenet_npz`): ``images`` uint8 ``(N, H, W, 3)`` or ``(N, 3, H, W)``,
``labels`` (specific class per image), ``label_general`` (general category per image), and optionally
``class_names`` / ``general_names`` (str).

Result: RGB uint8 ``(N, 3, H, W)``; class metadata ``parent`` (the general category) and ``split``;
:func:`class_hierarchy` gives the mapping specific class → general category.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metaprox.data.labelled import DatasetLayoutError, LabelledImages, data_root
from metaprox.data.miniimagenet import SPLITS, load_rgb_folder_images

__all__ = ["read_tieredimagenet", "load_tieredimagenet_npz", "read_hierarchy_csv", "class_hierarchy"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def read_hierarchy_csv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(specific, general)`` pairs of a tieredImageNet split file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(
            f"tieredImageNet: expected the hierarchy file {path} (lines 'specific,general')."
        )
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and [c.strip() for c in rows[0][:2]] == ["specific", "general"]:
        rows = rows[1:]
    out = []
    for n, row in enumerate(rows, 1):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetLayoutError(
                f"{path}: row {n} is {row}; expected two fields 'specific,general'."
            )
        out.append((row[0].strip(), row[1].strip()))
    return out


def class_hierarchy(images: LabelledImages) -> dict[str, str]:
    """Mapping class name → parent (general category) from a tieredImageNet :class:`LabelledImages`."""
    if "parent" not in images.class_meta:
        raise KeyError(f"{images.name} carries no class hierarchy (class_meta['parent']).")
    return dict(zip(images.class_names, images.class_meta["parent"], strict=True))


def read_tieredimagenet(
    root: str | os.PathLike | None = None, split: str | Sequence[str] = "train", size: int | None = 84
) -> LabelledImages:
    """Read the class folders of the split(s), in hierarchy-file order, with their general categories."""
    base = data_root("tieredimagenet", root)
    splits = [split] if isinstance(split, str) else list(split)
    files: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    parents: list[str] = []
    meta_split: list[str] = []
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; choose from {SPLITS}.")
        for specific, general in read_hierarchy_csv(base / f"{s}.csv"):
            folder = base / s / specific
            if not folder.is_dir():
                raise DatasetLayoutError(
                    f"tieredImageNet: expected the class folder {folder} (listed in {s}.csv)."
                )
            imgs = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not imgs:
                raise DatasetLayoutError(f"tieredImageNet: {folder} holds no .jpg/.jpeg/.png images.")
            labels.extend([len(names)] * len(imgs))
            files.extend(imgs)
            names.append(specific)
            parents.append(general)
            meta_split.append(s)
    images = load_rgb_folder_images(files, size)
    return LabelledImages(
        images,
        np.asarray(labels, dtype=np.int64),
        names,
        {"parent": parents, "split": meta_split},
        "tieredimagenet",
    )


def load_tieredimagenet_npz(path: str | os.PathLike, split: str | None = None) -> LabelledImages:
    """Load one split stored as arrays (see the module docstring); no pickle."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(
            f"tieredImageNet: expected the array file {path} (images, labels, label_general)."
        )
    with np.load(path, allow_pickle=False) as d:
        missing = {"images", "labels", "label_general"} - set(d.files)
        if missing:
            raise DatasetLayoutError(f"{path} lacks the arrays {sorted(missing)}; it has {d.files}.")
        images, spec, gen = (
            d["images"],
            d["labels"].astype(np.int64),
            d["label_general"].astype(np.int64),
        )
        cnames = [str(n) for n in d["class_names"]] if "class_names" in d.files else None
        gnames = [str(n) for n in d["general_names"]] if "general_names" in d.files else None
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise DatasetLayoutError(
            f"{path}: images must be (N, H, W, 3) or (N, 3, H, W), got {images.shape}."
        )
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    values, labels = np.unique(spec, return_inverse=True)
    parents = []
    for v in values:
        g = np.unique(gen[spec == v])
        if len(g) != 1:
            raise DatasetLayoutError(
                f"{path}: specific class {v} has images in several general categories {g}."
            )
        parents.append(gnames[g[0]] if gnames else str(g[0]))
    names = [cnames[v] for v in values] if cnames else [str(v) for v in values]
    meta = {"parent": parents, "split": [split or path.stem] * len(names)}
    return LabelledImages(images, labels.astype(np.int64), names, meta, "tieredimagenet")
