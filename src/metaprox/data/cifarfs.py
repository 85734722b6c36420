"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018) from the CIFAR-100 *binary* release.

Layout (``root`` default ``$METAPROX_DATA/cifar100``): the extracted ``cifar-100-binary`` folder, i.e.
``train.bin`` and ``test.bin``, each a sequence of 3074-byte records (coarse label byte, fine label byte,
3072 pixel bytes: 1024 red, 1024 green, 1024 blue, rows of 32). ``fine_label_names.txt`` /
``coarse_label_names.txt`` are used when present. The Python "pickle" release is never read.

Both benchmarks pool train.bin and test.bin (600 images per class) and split the 100 classes:

- CIFAR-FS: 64 / 16 / 20 classes (:data:`CIFAR_FS_SPLITS`; val and test as published, train = the rest);
- FC100: by superclass, 12 / 4 / 4 superclasses = 60 / 20 / 20 classes (:data:`FC100_SPLITS`).

Either split can be replaced by a text file per split (one class name per line) via ``split_file``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metaprox.data.labelled import DatasetLayoutError, LabelledImages, data_root

__all__ = [
    "read_cifar100_binary",
    "read_cifar_fs",
    "read_fc100",
    "CIFAR100_FINE_NAMES",
    "CIFAR100_COARSE_NAMES",
    "CIFAR_FS_SPLITS",
    "FC100_SPLITS",
    "RECORD_BYTES",
]

RECORD_BYTES = 2 + 3 * 32 * 32

CIFAR100_FINE_NAMES: tuple[str, ...] = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)
CIFAR100_COARSE_NAMES: tuple[str, ...] = (
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
)

_FS_VAL = (
    "otter",
    "motorcycle",
    "television",
    "lamp",
    "crocodile",
    "shark",
    "butterfly",
    "beaver",
    "beetle",
    "tractor",
    "flatfish",
    "maple_tree",
    "camel",
    "crab",
    "sea",
    "cattle",
)
_FS_TEST = (
    "baby",
    "bed",
    "bicycle",
    "chimpanzee",
    "fox",
    "leopard",
    "man",
    "pickup_truck",
    "plain",
    "poppy",
    "rocket",
    "rose",
    "snail",
    "sweet_pepper",
    "table",
    "telephone",
    "wardrobe",
    "whale",
    "woman",
    "worm",
)
CIFAR_FS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": tuple(n for n in CIFAR100_FINE_NAMES if n not in _FS_VAL + _FS_TEST),
    "val": _FS_VAL,
    "test": _FS_TEST,
}
FC100_SPLITS: dict[str, tuple[int, ...]] = {  # superclass ids (indices into CIFAR100_COARSE_NAMES)
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}


def _names(path: Path, default: tuple[str, ...]) -> list[str]:
    if path.is_file():
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if len(names) != len(default):
            raise DatasetLayoutError(f"{path}: {len(names)} names, expected {len(default)}.")
        return names
    return list(default)


def read_cifar100_binary(
    root: str | os.PathLike | None = None, files: tuple[str, ...] = ("train.bin", "test.bin")
) -> LabelledImages:
    """All records of ``files`` as one dataset: ``(N, 3, 32, 32)`` uint8, 100 fine classes, coarse meta."""
    base = data_root("cifar100", root)
    chunks = []
    for f in files:
        path = base / f
        if not path.is_file():
            raise DatasetLayoutError(
                f"CIFAR-100: expected the binary file {path} (from cifar-100-binary.tar.gz; "
                f"records of 1 coarse + 1 fine label byte + 3072 pixel bytes)."
            )
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD_BYTES:
            raise DatasetLayoutError(
                f"CIFAR-100: {path} has {raw.size} bytes, not a multiple of the "
                f"{RECORD_BYTES}-byte record; the file is truncated or not the binary release."
            )
        chunks.append(raw.reshape(-1, RECORD_BYTES))
    rec = np.concatenate(chunks)
    coarse, fine = rec[:, 0].astype(np.int64), rec[:, 1].astype(np.int64)
    if fine.max() >= 100 or coarse.max() >= 20:
        raise DatasetLayoutError(
            f"CIFAR-100: label bytes out of range in {base} (fine ≤ 99, coarse ≤ 19 expected)."
        )
    images = np.ascontiguousarray(rec[:, 2:].reshape(-1, 3, 32, 32))
    fine_names = _names(base / "fine_label_names.txt", CIFAR100_FINE_NAMES)
    coarse_names = _names(base / "coarse_label_names.txt", CIFAR100_COARSE_NAMES)
    parent = np.full(100, -1, dtype=np.int64)
    parent[fine] = coarse
    pairs = np.unique(np.stack([fine, coarse], 1), axis=0)
    if len(pairs) != len(np.unique(fine)):
        raise DatasetLayoutError(
            "CIFAR-100: a fine class appears with several coarse labels; the file is corrupt."
        )
    meta = {"coarse": [coarse_names[p] if p >= 0 else "" for p in parent], "coarse_id": parent.tolist()}
    return LabelledImages(images, fine, fine_names, meta, "cifar100")


def _split_classes(split: str, split_file: str | os.PathLike | None, default: dict) -> list[str] | None:
    if split_file is not None:
        path = Path(split_file)
        if not path.is_file():
            raise DatasetLayoutError(
                f"expected the split file {path} (one CIFAR-100 class name per line)."
            )
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if split not in default:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(default)} or pass split_file.")
    return None


def read_cifar_fs(
    root: str | os.PathLike | None = None,
    split: str = "train",
    split_file: str | os.PathLike | None = None,
) -> LabelledImages:
    """CIFAR-FS classes of ``split`` (or of ``split_file``), relabelled 0..K−1 in split-list order."""
    names = _split_classes(split, split_file, CIFAR_FS_SPLITS) or list(CIFAR_FS_SPLITS[split])
    full = read_cifar100_binary(root)
    sub = full.subset(full.class_ids(names))
    return LabelledImages(
        sub.images,
        sub.labels,
        sub.class_names,
        {**sub.class_meta, "split": [split] * len(names)},
        f"cifar-fs-{split}",
    )


def read_fc100(
    root: str | os.PathLike | None = None,
    split: str = "train",
    split_file: str | os.PathLike | None = None,
) -> LabelledImages:
    """FC100 classes of ``split``: every fine class of the split's superclasses (ordered by fine id)."""
    names = _split_classes(split, split_file, FC100_SPLITS)
    full = read_cifar100_binary(root)
    if names is None:
        supers = set(FC100_SPLITS[split])
        ids = [k for k, c in enumerate(full.class_meta["coarse_id"]) if c in supers]
    else:
        ids = full.class_ids(names)
    sub = full.subset(ids)
    return LabelledImages(
        sub.images,
        sub.labels,
        sub.class_names,
        {**sub.class_meta, "split": [split] * len(ids)},
        f"fc100-{split}",
    )
