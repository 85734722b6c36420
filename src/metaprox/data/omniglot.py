"""Omniglot (Lake et al. 2015): the official PNG folders, the compact 28×28 arrays, split lists, download.

Three sources, one result (:class:`LabelledImages`, ink = 255, background = 0, one class per character named
``"Alphabet/characterNN"``, class metadata ``alphabet``, ``character``, ``split`` ∈ {background, evaluation}):

- :func:`read_omniglot_folders` — ``<root>/images_background/<Alphabet>/characterNN/*.png`` and
  ``<root>/images_evaluation/...`` as in the official zips; area-averaged to ``size`` (default 28).
- :func:`load_omniglot_npz` — ``omniglot28.npz`` (255 = background in the file; sha256-verified).
- :func:`download_omniglot` — opt-in download + safe extraction of the official zips.

:func:`vinyals_split` turns a Vinyals et al. (2016) split list (``train.txt``: ``Alphabet/characterNN/rotDDD``
per line) into a dataset whose classes are (character, rotation) pairs, images rotated counter-clockwise.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from metaprox.data.checksum import sha256_file, verify_sha256
from metaprox.data.download import download_file
from metaprox.data.labelled import DatasetLayoutError, LabelledImages, data_root, read_image, resize_area

__all__ = [
    "read_omniglot_folders",
    "load_omniglot_npz",
    "read_split_list",
    "vinyals_split",
    "download_omniglot",
    "OMNIGLOT28_SHA256",
    "OMNIGLOT_SUBSETS",
    "OMNIGLOT_BASE_URL",
]

OMNIGLOT28_SHA256 = "ad6f19bfcf8e63ea259bfa61484f2629f3d365b160c2d53a3933c96e77e498fb"
OMNIGLOT_SUBSETS = {"images_background": "background", "images_evaluation": "evaluation"}
OMNIGLOT_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
_SPLIT_LINE = re.compile(r"^(?P<char>[^/\s]+/character\d+)/rot(?P<rot>\d{3})$")


def _omniglot_dir(root: str | os.PathLike | None) -> Path:
    return data_root("omniglot", root)


def read_omniglot_folders(
    root: str | os.PathLike | None = None,
    subsets: Sequence[str] = ("images_background", "images_evaluation"),
    size: int | None = 28,
) -> LabelledImages:
    """Read the official PNG layout under ``root`` (default ``$METAPROX_DATA/omniglot``).

    Args:
        root: folder containing ``images_background/`` and/or ``images_evaluation/``.
        subsets: which of the two folders to read.
        size: output side length (area-average resize of the 105×105 originals); None keeps the original size.
    """
    base = _omniglot_dir(root)
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    meta: dict[str, list] = {"alphabet": [], "character": [], "split": []}
    for subset in subsets:
        if subset not in OMNIGLOT_SUBSETS:
            raise ValueError(
                f"unknown Omniglot subset {subset!r}; choose from {sorted(OMNIGLOT_SUBSETS)}."
            )
        folder = base / subset
        if not folder.is_dir():
            raise DatasetLayoutError(
                f"Omniglot: expected the folder {folder} (from {subset}.zip, holding "
                f"<Alphabet>/characterNN/*.png); download with download_omniglot(root)."
            )
        for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
            chars = sorted(
                p for p in alphabet.iterdir() if p.is_dir() and p.name.startswith("character")
            )
            if not chars:
                raise DatasetLayoutError(f"Omniglot: {alphabet} has no characterNN/ sub-folders.")
            for char in chars:
                files = sorted(char.glob("*.png"))
                if not files:
                    raise DatasetLayoutError(f"Omniglot: {char} contains no .png drawings.")
                k = len(names)
                names.append(f"{alphabet.name}/{char.name}")
                meta["alphabet"].append(alphabet.name)
                meta["character"].append(int(char.name[len("character") :]))
                meta["split"].append(OMNIGLOT_SUBSETS[subset])
                ink = 1.0 - np.stack([read_image(f, "L") for f in files])
                if size is not None and ink.shape[1:] != (size, size):
                    ink = resize_area(ink, size)
                images.append(np.clip(np.rint(ink * 255.0), 0, 255).astype(np.uint8))
                labels.extend([k] * len(files))
    if not names:
        raise DatasetLayoutError(
            f"Omniglot: no characters found under {base} for subsets {list(subsets)}."
        )
    return LabelledImages(
        np.concatenate(images), np.asarray(labels, dtype=np.int64), names, meta, "omniglot"
    )


def load_omniglot_npz(
    path: str | os.PathLike | None = None, verify: bool = True, sha256: str | None = OMNIGLOT28_SHA256
) -> LabelledImages:
    """Load ``omniglot28.npz`` (default ``$METAPROX_DATA/omniglot/omniglot28.npz``), inverted to ink = 255.

    ``verify`` checks the file's sha256 against ``sha256`` (the published hash of the known file).
    Arrays are read with ``allow_pickle=False``.
    """
    path = Path(path) if path is not None else _omniglot_dir(None) / "omniglot28.npz"
    if not path.is_file():
        raise DatasetLayoutError(
            f"Omniglot: expected the array file {path} (images uint8 (N, 28, 28) with "
            f"255 = background, plus class_label, alphabet, character, split, "
            f"alphabet_names, split_names)."
        )
    if verify and sha256:
        verify_sha256(path, sha256)
    with np.load(path, allow_pickle=False) as d:
        needed = {
            "images",
            "class_label",
            "alphabet",
            "character",
            "split",
            "alphabet_names",
            "split_names",
        }
        missing = needed - set(d.files)
        if missing:
            raise DatasetLayoutError(f"Omniglot: {path} lacks the arrays {sorted(missing)}.")
        images = 255 - d["images"]
        labels = d["class_label"].astype(np.int64)
        alphabet, character, split = d["alphabet"], d["character"], d["split"]
        alphabet_names, split_names = d["alphabet_names"], d["split_names"]
    k = int(labels.max()) + 1
    first = np.full(k, -1, dtype=np.int64)
    first[labels[::-1]] = np.arange(len(labels))[::-1]
    if (first < 0).any():
        raise DatasetLayoutError(
            f"Omniglot: {path} has class labels with no image (labels must be 0..{k - 1})."
        )
    alph = [str(alphabet_names[alphabet[i]]) for i in first]
    chars = [int(character[i]) for i in first]
    names = [f"{a}/character{c:02d}" for a, c in zip(alph, chars, strict=True)]
    meta = {"alphabet": alph, "character": chars, "split": [str(split_names[split[i]]) for i in first]}
    return LabelledImages(images, labels, names, meta, "omniglot")


def read_split_list(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Parse a Vinyals split list into ``(class name "Alphabet/characterNN", rotation in degrees)`` pairs."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(
            f"Omniglot: expected the split list {path} (lines 'Alphabet/characterNN/rotDDD')."
        )
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        m = _SPLIT_LINE.match(line)
        if m is None or int(m["rot"]) % 90:
            raise DatasetLayoutError(
                f"{path}:{n}: {line!r} is not of the form 'Alphabet/characterNN/rotDDD' "
                f"with DDD in 000, 090, 180, 270."
            )
        out.append((m["char"], int(m["rot"])))
    return out


def vinyals_split(
    images: LabelledImages, split: str | os.PathLike = "train", root: str | os.PathLike | None = None
) -> LabelledImages:
    """The classes of a Vinyals split list as their own dataset: one class per (character, rotation).

    ``split`` is ``"train"``, ``"val"``, ``"test"``, ``"trainval"`` (read from ``root``, default
    ``$METAPROX_DATA/omniglot``) or a path to a list file. Class names are ``"Alphabet/characterNN/rotDDD"``;
    metadata adds ``rotation`` and ``base_class`` (the class id in ``images``).
    """
    path = (
        Path(split)
        if str(split) not in ("train", "val", "test", "trainval")
        else _omniglot_dir(root) / f"{split}.txt"
    )
    pairs = read_split_list(path)
    base_ids = images.class_ids([c for c, _ in pairs])
    order = np.argsort(images.labels, kind="stable")
    counts = images.class_counts()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    imgs, labels = [], []
    for k, (bid, (_, rot)) in enumerate(zip(base_ids, pairs, strict=True)):
        rows = order[starts[bid] : starts[bid] + counts[bid]]
        imgs.append(np.rot90(images.images[rows], k=rot // 90, axes=(-2, -1)))
        labels.append(np.full(len(rows), k, dtype=np.int64))
    meta = {key: [v[b] for b in base_ids] for key, v in images.class_meta.items()}
    meta["rotation"] = [r for _, r in pairs]
    meta["base_class"] = list(base_ids)
    names = [f"{c}/rot{r:03d}" for c, r in pairs]
    return LabelledImages(
        np.ascontiguousarray(np.concatenate(imgs)),
        np.concatenate(labels),
        names,
        meta,
        f"omniglot-{Path(path).stem}",
    )


def _safe_extract(archive: Path, dest: Path) -> None:
    dest_resolved = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            target = (dest / member).resolve()
            if dest_resolved != target and dest_resolved not in target.parents:
                raise DatasetLayoutError(
                    f"{archive}: member {member!r} would extract outside {dest}; refusing."
                )
        zf.extractall(dest)


def download_omniglot(
    root: str | os.PathLike | None = None,
    base_url: str = OMNIGLOT_BASE_URL,
    sha256: Mapping[str, str] | None = None,
    subsets: Sequence[str] = ("images_background", "images_evaluation"),
    timeout: float = 60.0,
) -> dict[str, str]:
    """Download (opt-in) and extract the official Omniglot zips into ``root``; returns each zip's sha256.

    Args:
        root: destination (default ``$METAPROX_DATA/omniglot``); ``<subset>.zip`` and ``<subset>/``
            end up there.
        base_url: folder URL holding ``images_background.zip`` and ``images_evaluation.zip``.
        sha256: ``{"images_background.zip": hex, ...}``; a zip whose hash differs is discarded with an error.
            Without an entry the zip is not hash-checked (the returned hashes let you pin them), but the
            extracted folder must exist.
    """
    dest = _omniglot_dir(root)
    hashes = {}
    for subset in subsets:
        if subset not in OMNIGLOT_SUBSETS:
            raise ValueError(
                f"unknown Omniglot subset {subset!r}; choose from {sorted(OMNIGLOT_SUBSETS)}."
            )
        fname = f"{subset}.zip"
        expected = (sha256 or {}).get(fname)
        archive = download_file(
            base_url.rstrip("/") + "/" + fname, dest / fname, expected, timeout=timeout
        )
        hashes[fname] = sha256_file(archive)
        if not (dest / subset).is_dir():
            _safe_extract(archive, dest)
        if not (dest / subset).is_dir():
            raise DatasetLayoutError(f"Omniglot: {archive} did not contain the folder {subset}/.")
    return hashes
