"""`LabelledImages` — the one container every dataset reader returns — plus shared reading helpers.

Conventions: ``images`` is a numpy array ``(N, C, H, W)`` or ``(N, H, W)``, uint8 (0..255) or float
(0..1), where *larger means more signal*: Omniglot readers store ink = 255 (the files use 0 = ink), so
that an episode sampler only divides by 255. ``labels`` are class ids ``0..K−1``; ``class_names[k]``
names class k; every entry of ``class_meta`` is a length-K sequence (alphabet, split, parent category, ...).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LabelledImages", "DatasetLayoutError", "data_root", "read_image", "resize_area", "ENV_VAR"]

ENV_VAR = "METAPROX_DATA"


class DatasetLayoutError(FileNotFoundError):
    """A dataset is missing, incomplete or not in the layout a reader expects (the message says which)."""


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """Images with integer class ids, class names and per-class metadata.

    Args:
        images: ``(N, C, H, W)`` or ``(N, H, W)`` array, uint8 or floating point (larger = more signal).
        labels: ``(N,)`` integer class ids in ``0..len(class_names)−1``.
        class_names: one name per class (e.g. ``"Angelic/character01"``, a WordNet id, a CIFAR name).
        class_meta: per-class metadata, each value a sequence of length ``num_classes``.
        name: dataset name, for messages.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    class_meta: dict[str, Any] = field(default_factory=dict)
    name: str = "images"

    def __post_init__(self) -> None:
        imgs, labels = np.asarray(self.images), np.asarray(self.labels)
        if imgs.ndim not in (3, 4):
            raise ValueError(
                f"{self.name}: images must be (N, H, W) or (N, C, H, W), got shape {imgs.shape}."
            )
        if not (imgs.dtype == np.uint8 or np.issubdtype(imgs.dtype, np.floating)):
            raise ValueError(f"{self.name}: images must be uint8 or float, got {imgs.dtype}.")
        if (
            labels.ndim != 1
            or labels.shape[0] != imgs.shape[0]
            or not np.issubdtype(labels.dtype, np.integer)
        ):
            raise ValueError(
                f"{self.name}: labels must be an integer array of shape ({imgs.shape[0]},), got "
                f"{labels.dtype} {labels.shape}."
            )
        k = len(self.class_names)
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(
                f"{self.name}: labels span {labels.min()}..{labels.max()} but there are {k} class "
                f"names; labels must lie in 0..{k - 1}."
            )
        for key, value in self.class_meta.items():
            if len(value) != k:
                raise ValueError(
                    f"{self.name}: class_meta[{key!r}] has {len(value)} entries for {k} classes."
                )
        object.__setattr__(self, "images", imgs)
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        object.__setattr__(self, "class_names", [str(c) for c in self.class_names])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image; C = 1 for (N, H, W) storage."""
        s = self.images.shape
        return (1, s[1], s[2]) if len(s) == 3 else (s[1], s[2], s[3])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def classes_where(self, key: str, value: Any) -> list[int]:
        """Ids of the classes whose ``class_meta[key]`` equals ``value``."""
        if key not in self.class_meta:
            raise KeyError(
                f"{self.name} has no class metadata {key!r}; available: {sorted(self.class_meta)}."
            )
        return [k for k, v in enumerate(self.class_meta[key]) if v == value]

    def class_ids(self, names: Sequence[str]) -> list[int]:
        """Class ids of the given class names (KeyError naming the first unknown one)."""
        index = {n: k for k, n in enumerate(self.class_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise KeyError(f"{self.name}: {len(missing)} class names not found, e.g. {missing[0]!r}.")
        return [index[n] for n in names]

    def subset(self, classes: Sequence[int]) -> LabelledImages:
        """The images of ``classes`` only, relabelled ``0..len(classes)−1`` in the given order."""
        classes = [int(c) for c in classes]
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[classes] = np.arange(len(classes))
        keep = np.flatnonzero(remap[self.labels] >= 0)
        meta = {k: [v[c] for c in classes] for k, v in self.class_meta.items()}
        return LabelledImages(
            self.images[keep],
            remap[self.labels[keep]],
            [self.class_names[c] for c in classes],
            meta,
            self.name,
        )


def data_root(subdir: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$METAPROX_DATA``; joined with ``subdir``. Raises if neither is set."""
    if root is None:
        env = os.environ.get(ENV_VAR)
        if not env:
            raise DatasetLayoutError(
                f"no data location given: pass the path explicitly or set the environment "
                f"variable {ENV_VAR} to the folder holding the datasets"
                + (f" (expected {ENV_VAR}/{subdir})." if subdir else ".")
            )
        path = Path(env) / subdir if subdir else Path(env)
    else:
        path = Path(root)
    return path


def read_image(path: str | os.PathLike, mode: str = "L") -> np.ndarray:
    """One image file as float32 in [0, 1]: ``(H, W)`` for ``mode="L"``, ``(H, W, 3)`` for ``"RGB"``.

    Uses Pillow when installed (any format), else matplotlib (PNG only).
    """
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}.")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    else:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    if Path(path).suffix.lower() != ".png":
        raise RuntimeError(
            f"reading {path} needs Pillow (pip install pillow); without it only PNG files can "
            f"be read (through matplotlib)."
        )
    import matplotlib.image as mpimg

    arr = np.asarray(mpimg.imread(Path(path)), dtype=np.float32)
    if arr.dtype != np.float32 or arr.max() > 1.0:
        arr = arr / 255.0
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if mode == "L":
        return arr if arr.ndim == 2 else arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def resize_area(images: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """Area-average resize of ``(N, H, W)`` or ``(N, C, H, W)`` images to ``size``; float32 result.

    Exact box averaging when the size divides evenly (105 → 35), adaptive box averaging otherwise
    (``torch.nn.functional.interpolate(mode="area")``).
    """
    t = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    squeeze = t.dim() == 3
    if squeeze:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ValueError(
            f"resize_area expects (N, H, W) or (N, C, H, W) images, got shape {tuple(t.shape)}."
        )
    hw = (size, size) if isinstance(size, int) else tuple(size)
    out = F.interpolate(t, size=hw, mode="area")
    return (out.squeeze(1) if squeeze else out).numpy()
