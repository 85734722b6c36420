"""Decode a list of image files once into a cached uint8 array, memory-mapped on later runs.

A dataset of many small JPEGs (miniImageNet: 60,000 files) costs tens of seconds to decode on every run; the
cache decodes them once (optionally with a process pool) into ``(N, 3, size, size)`` uint8 ``.npy`` files that a
later run maps into memory in milliseconds.

Location: ``cache_dir`` if given, else ``$METAPROX_CACHE``, else ``~/.cache/metaprox`` — never the (possibly
read-only) data folder. One file per source list: ``<cache>/<name>/<split>-<key>.npy``, where the key is a sha256
over the format version, the image size, the given source bytes (e.g. the split CSV) and, per image in order, its
path, size in bytes and modification time (ns). Any change to the sources gives a new key: the array is rebuilt
and the stale files of that split are removed. Writes go to a temporary file that is fsynced and renamed, so an
interrupted build never leaves a file under a real name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from metaprox.data.labelled import DatasetLayoutError

__all__ = ["CACHE_ENV_VAR", "cache_root", "source_key", "cached_images", "decode_rgb_files"]

CACHE_ENV_VAR = "METAPROX_CACHE"
FORMAT_VERSION = 1
_CHUNK = 512  # files per pool job: large enough to amortise the job overhead, small enough to balance


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$METAPROX_CACHE``, else ``~/.cache/metaprox``."""
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "metaprox"


def source_key(paths: Sequence[Path], size: int, source_bytes: bytes = b"") -> str:
    """sha256 (hex) over the format, size, ``source_bytes`` and each file's path, byte size and mtime.

    Raises :class:`DatasetLayoutError` listing the files that do not exist.
    """
    h = hashlib.sha256(f"metaprox-image-cache {FORMAT_VERSION} {size}\n".encode())
    h.update(hashlib.sha256(source_bytes).digest())
    missing = []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            missing.append(p)
            continue
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if missing:
        shown = ", ".join(str(m) for m in missing[:3])
        raise DatasetLayoutError(
            f"{len(missing)} of {len(paths)} listed image files do not exist (e.g. {shown}); the image folder "
            f"is incomplete or the list names files it does not hold — restore the files or fix the list."
        )
    return h.hexdigest()


def _decode_one(path: Path, size: int) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - a machine with torchvision but without Pillow
        return _decode_torchvision(path, size)
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale when the file is larger
            img = im.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BOX)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        raise DatasetLayoutError(
            f"cannot decode the image file {path} ({e}); it is damaged or truncated — replace it with an intact "
            f"copy."
        ) from None


def _decode_torchvision(path: Path, size: int) -> np.ndarray:  # pragma: no cover - used only without Pillow
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:
        raise RuntimeError(f"decoding {path} needs Pillow (pip install pillow) or torchvision.") from None
    try:
        img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise DatasetLayoutError(f"cannot decode the image file {path} ({e}); it is damaged or truncated — replace "
                                 f"it with an intact copy.") from None
    if tuple(img.shape[1:]) != (size, size):
        img = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="area")[0]
        img = img.round().clamp(0, 255).to(torch.uint8)
    return img.numpy()


def decode_rgb_files(paths: Sequence[Path], size: int, out: np.ndarray, start: int = 0) -> None:
    """Decode ``paths`` as RGB into ``out[start:start + len(paths)]`` ((N, 3, size, size) uint8)."""
    for i, p in enumerate(paths):
        out[start + i] = _decode_one(p, size)


def _decode_chunk(target: str, paths: list[Path], size: int, start: int) -> None:
    """Pool job: decode one chunk straight into the temporary .npy (no array travels back through a pipe)."""
    out = np.load(target, mmap_mode="r+")
    decode_rgb_files(paths, size, out, start)
    out.flush()


def _build(target: Path, paths: Sequence[Path], size: int, workers: int) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
        if workers <= 1 or len(paths) <= _CHUNK:
            decode_rgb_files(paths, size, out)
        else:
            del out  # the workers open the file themselves
            # the platform's default start method (fork on Linux before Python 3.14): the workers only run Pillow
            # and numpy, never CUDA or torch ops, so forking a parent that initialised CUDA is safe
            with ProcessPoolExecutor(max_workers=workers) as pool:
                jobs = [pool.submit(_decode_chunk, str(tmp), list(paths[i : i + _CHUNK]), size, i)
                        for i in range(0, len(paths), _CHUNK)]
                for job in jobs:
                    job.result()  # re-raises a worker's DatasetLayoutError (damaged file)
            out = np.load(tmp, mmap_mode="r+")
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def cached_images(name: str, split: str, paths: Sequence[Path], size: int, source_bytes: bytes = b"",
                  cache_dir: str | os.PathLike | None = None, workers: int = 0) -> np.ndarray:
    """The images ``paths`` as a memory-mapped ``(N, 3, size, size)`` uint8 array, decoded on first use.

    The map is copy-on-write: the array is writable (torch can wrap it without a copy), but writes stay in this
    process's memory and never reach the cache file.

    Args:
        name, split: cache sub-folder and file prefix (e.g. ``"miniimagenet"``, ``"train"``).
        paths: image files in row order. size: side of the square output (other sizes are box-resized).
        source_bytes: further bytes the key covers (e.g. the split CSV).
        cache_dir: see :func:`cache_root`. workers: decoding processes (0: one per CPU, at most 16; 1: in-process).
    """
    if size < 1:
        raise ValueError(f"size must be ≥ 1, got {size}.")
    key = source_key(paths, size, source_bytes)[:20]
    folder = cache_root(cache_dir) / name
    target = folder / f"{split}-{key}.npy"
    if not target.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetLayoutError(
                f"cannot create the image cache folder {folder} ({e}); point ${CACHE_ENV_VAR} (or task.cache_dir) "
                f"at a writable folder."
            ) from None
        if workers <= 0:
            workers = min(os.cpu_count() or 1, 16)
        _build(target, paths, size, workers)
        for stale in folder.glob(f"{split}-*.npy"):
            if stale != target:
                stale.unlink(missing_ok=True)
    arr = np.load(target, mmap_mode="c")
    if arr.shape != (len(paths), 3, size, size) or arr.dtype != np.uint8:
        raise DatasetLayoutError(
            f"the cached array {target} has shape {arr.shape} {arr.dtype}, expected "
            f"{(len(paths), 3, size, size)} uint8; delete it to rebuild."
        )
    return arr
