"""Which file a step used: its path and the sha256 of its bytes, so that a run records the body
model and prior of every step and refuses a file that changed under it."""
from __future__ import annotations

import hashlib
from pathlib import Path

from fitting.errors import BadInput


def file_identity(path: str | Path, what: str = "file") -> dict[str, str]:
    """{'path': the absolute path, 'sha256': of the file's bytes}: which file a step used."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{what} not found: {path}")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def check_identity(identity: dict[str, str], sha256: str | None, what: str) -> None:
    """BadInput when a file's content is not the one a run pinned (sha256 None: nothing pinned)."""
    if sha256 and identity["sha256"] != sha256:
        raise BadInput(f"{what} {identity['path']} is not the one this run uses (sha256 {identity['sha256'][:12]}, "
                       f"expected {sha256[:12]}): it changed since the run started")
