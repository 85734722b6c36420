"""A tiny Omniglot in the official PNG-folder layout, for the tests that train on episodes."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

ALPHABETS = {"images_background": ["A1", "A2", "A3", "A4"], "images_evaluation": ["E1", "E2"]}


def make_omniglot(root: Path, chars: int = 3, drawings: int = 4) -> None:
    """Every character: a fixed random 28×28 ink pattern, each drawing with a few pixels flipped."""
    rng = np.random.default_rng(0)
    for subset, alphabets in ALPHABETS.items():
        for alphabet in alphabets:
            for c in range(chars):
                folder = root / subset / alphabet / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                ink = rng.random((28, 28)) < 0.2
                for d in range(drawings):
                    img = np.where(ink ^ (rng.random((28, 28)) < 0.02), 0.0, 1.0)  # ink is black in the PNGs
                    mpimg.imsave(folder / f"{c:04d}_{d + 1:02d}.png", img, cmap="gray", vmin=0, vmax=1)
