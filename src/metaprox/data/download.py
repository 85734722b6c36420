"""Opt-in, verified downloads: fetch a URL to a temporary file, check its sha256, then move it in place."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from metaprox.data.checksum import ChecksumError, sha256_file

__all__ = ["download_file"]


def download_file(url: str, dest: str | os.PathLike, sha256: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (skipped if ``dest`` exists with the right hash); returns ``dest``.

    The file is written to ``dest.part`` and renamed only once its sha256 matches, so an interrupted or
    corrupt download never leaves a file that looks complete. ``sha256=None`` skips verification.
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
            while block := resp.read(1 << 20):
                out.write(block)
        if sha256 is not None:
            got = sha256_file(part)
            if got != sha256.lower():
                raise ChecksumError(
                    f"download of {url}: sha256 {got} does not match the expected {sha256}; "
                    f"the file was discarded. Check the URL or the expected hash."
                )
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
    return dest
