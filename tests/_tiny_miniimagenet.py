"""A tiny miniImageNet in exactly the standard layout (images/ + train/val/test.csv), generated: no ImageNet pixels.

Every class has its own colour; each image is that colour plus a little noise, saved as a small JPEG, so a
classifier can learn the classes and the decoded pixels can be checked against the colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPLIT_CLASSES = {"train": 4, "val": 2, "test": 2}


def class_colour(k: int) -> np.ndarray:
    """RGB colour (uint8) of global class k: distinct, far from each other."""
    return np.array([(60 * k + 30) % 256, (110 * k + 90) % 256, (170 * k + 200) % 256], dtype=np.uint8)


def wnid(k: int) -> str:
    return f"n{k + 1:08d}"


def make_miniimagenet(root: Path, per_class: int = 6, side: int = 12, classes: dict[str, int] | None = None) -> None:
    """Write ``root/images/<wnid><index>.jpg`` and ``root/{train,val,test}.csv`` (header ``filename,label``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    k = 0
    for split, n_classes in (classes or SPLIT_CLASSES).items():
        lines = ["filename,label"]
        for _ in range(n_classes):
            for i in range(per_class):
                name = f"{wnid(k)}{i + 1:08d}.jpg"
                noise = rng.integers(-6, 7, size=(side, side, 3))
                img = np.clip(class_colour(k)[None, None].astype(int) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / "images" / name, quality=95)
                lines.append(f"{name},{wnid(k)}")
            k += 1
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
