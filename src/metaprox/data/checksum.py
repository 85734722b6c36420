"""sha256 checksums of dataset files: compute, and verify against a known value with a clear error."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["ChecksumError", "sha256_file", "verify_sha256"]


class ChecksumError(ValueError):
    """A file's sha256 differs from the published value: it is corrupt, truncated or a different version."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` hashes to ``expected``."""
    got = sha256_file(path)
    if got != expected.lower():
        raise ChecksumError(
            f"{Path(path)}: sha256 is {got}, expected {expected}. The file is corrupt or a "
            f"different version; replace it with the published file (for a download: delete it and "
            f"download it again), or pass verify=False if you know it is right."
        )
