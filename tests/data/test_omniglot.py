"""Omniglot readers: PNG folders, compact npz (+ sha256), Vinyals split lists, download (local server)."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
import zipfile
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from metaprox.data import (
    ChecksumError,
    DatasetLayoutError,
    download_omniglot,
    load_omniglot_npz,
    read_omniglot_folders,
    read_split_list,
    sha256_file,
    vinyals_split,
)

SHARED = Path("/work/shared/data/omniglot")


def _make_folders(root: Path, side: int = 8) -> None:
    """2 background characters (alphabet A) + 1 evaluation character (alphabet B), 3 drawings each."""
    layout = {
        "images_background": {"Alpha": ["character01", "character02"]},
        "images_evaluation": {"Beta": ["character01"]},
    }
    for subset, alphabets in layout.items():
        for alphabet, chars in alphabets.items():
            for c, char in enumerate(chars):
                folder = root / subset / alphabet / char
                folder.mkdir(parents=True)
                for d in range(3):
                    img = np.ones((side, side), dtype=np.float32)  # white background
                    img[: 2 * (c + 1), :] = 0.0  # black ink rows
                    mpimg.imsave(folder / f"{c:04d}_{d + 1:02d}.png", img, cmap="gray", vmin=0, vmax=1)


def test_read_folders(tmp_path):
    _make_folders(tmp_path)
    d = read_omniglot_folders(tmp_path, size=4)
    assert d.images.shape == (9, 4, 4) and d.images.dtype == np.uint8
    assert d.class_names == ["Alpha/character01", "Alpha/character02", "Beta/character01"]
    assert d.class_meta["split"] == ["background", "background", "evaluation"]
    assert d.class_meta["alphabet"] == ["Alpha", "Alpha", "Beta"] and d.class_meta["character"] == [
        1,
        2,
        1,
    ]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # ink = 255: character01 has 2 of 8 rows inked → area-averaged to 1 of 4 rows at 255
    assert d.images[0, 0].tolist() == [255] * 4 and d.images[0, 1:].max() == 0
    bg = read_omniglot_folders(tmp_path, subsets=["images_background"], size=None)
    assert bg.images.shape == (6, 8, 8)


def test_read_folders_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="images_background"):
        read_omniglot_folders(tmp_path)
    (tmp_path / "images_background" / "Alpha" / "character01").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no .png"):
        read_omniglot_folders(tmp_path, subsets=["images_background"])


def _make_npz(path: Path) -> None:
    n_per, chars = 2, [(0, 1, 0), (0, 2, 0), (1, 1, 1)]  # (alphabet, character, split)
    rows = [(k, a, c, s) for k, (a, c, s) in enumerate(chars) for _ in range(n_per)]
    images = np.full((len(rows), 28, 28), 255, dtype=np.uint8)
    images[:, 0, 0] = 0
    np.savez(
        path,
        images=images,
        class_label=np.array([r[0] for r in rows], dtype=np.int16),
        char_id=np.array([r[0] + 1 for r in rows], dtype=np.int16),
        alphabet=np.array([r[1] for r in rows], dtype=np.int8),
        character=np.array([r[2] for r in rows], dtype=np.int8),
        drawer=np.tile(np.arange(1, n_per + 1), len(chars)).astype(np.int8),
        split=np.array([r[3] for r in rows], dtype=np.int8),
        alphabet_names=np.array(["Alpha", "Beta"]),
        split_names=np.array(["background", "evaluation"]),
    )


def test_npz_and_vinyals_split(tmp_path):
    path = tmp_path / "omniglot28.npz"
    _make_npz(path)
    with pytest.raises(ChecksumError, match="sha256"):
        load_omniglot_npz(path)  # not the published file
    d = load_omniglot_npz(path, sha256=sha256_file(path))
    assert d.class_names == ["Alpha/character01", "Alpha/character02", "Beta/character01"]
    assert d.class_meta["split"] == ["background", "background", "evaluation"]
    assert d.images[0, 0, 0] == 255 and d.images[0, 5, 5] == 0  # inverted: ink = 255
    (tmp_path / "train.txt").write_text(
        "Alpha/character02/rot000\nAlpha/character02/rot090\nBeta/character01/rot270\n"
    )
    v = vinyals_split(d, "train", root=tmp_path)
    assert v.class_names[1] == "Alpha/character02/rot090" and v.class_meta["rotation"] == [0, 90, 270]
    assert v.class_meta["base_class"] == [1, 1, 2] and v.images.shape == (6, 28, 28)
    assert v.images[2, 27, 0] == 255  # rot90 (counter-clockwise) moves the top-left pixel to bottom-left
    (tmp_path / "bad.txt").write_text("Alpha/character02/rot045\n")
    with pytest.raises(DatasetLayoutError, match="rotDDD"):
        read_split_list(tmp_path / "bad.txt")
    with pytest.raises(DatasetLayoutError, match="expected the array file"):
        load_omniglot_npz(tmp_path / "missing.npz")


@pytest.mark.skipif(not (SHARED / "omniglot28.npz").is_file(), reason="shared Omniglot copy not present")
def test_shared_copy():
    d = load_omniglot_npz(SHARED / "omniglot28.npz")
    assert d.images.shape == (32460, 28, 28) and d.num_classes == 1623
    assert len(d.classes_where("split", "background")) == 964
    assert vinyals_split(d, "val", root=SHARED).num_classes == 688


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_from_local_server(tmp_path):
    src = tmp_path / "src"
    _make_folders(src)
    served = tmp_path / "served"
    served.mkdir()
    for subset in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(served / f"{subset}.zip", "w") as zf:
            for f in sorted((src / subset).rglob("*")):
                zf.write(f, f.relative_to(src).as_posix())
    hashes = {
        f"{s}.zip": sha256_file(served / f"{s}.zip") for s in ("images_background", "images_evaluation")
    }
    server = _serve(served)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        dest = tmp_path / "dest"
        with pytest.raises(ChecksumError, match="does not match"):
            download_omniglot(dest, url, {"images_background.zip": "0" * 64}, timeout=10)
        assert not (dest / "images_background.zip").exists() and not list(dest.glob("*.part"))
        got = download_omniglot(dest, url, hashes, timeout=10)
        assert got == hashes
        assert read_omniglot_folders(dest, size=4).num_classes == 3
    finally:
        server.shutdown()
        shutil.rmtree(served)
