"""File checksums; imports neither torch nor Django, so dashboard processes can use it."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks so large adapters never sit in memory whole."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
