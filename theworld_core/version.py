"""The code version that keys cached stages: the package version plus a hash of its source."""

from __future__ import annotations

import functools
import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE = "theworld-multistage"


@functools.cache
def code_version() -> str:
    """`<version>+<12 hex of the source hash>`: changes whenever any theworld_core file changes."""
    try:
        release = version(PACKAGE)
    except PackageNotFoundError:
        release = "0+unknown"
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return f"{release}+{digest.hexdigest()[:12]}"
