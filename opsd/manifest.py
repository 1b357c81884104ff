"""A directory's manifest: every file's size and SHA-256, written last, so that a directory that was cut short or
altered later is recognised (and the file that differs named) before anyone trusts it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from opsd.atomic import write_text_atomic

MANIFEST = "MANIFEST.json"


def write_manifest(directory: str | Path) -> Path:
    """Sizes and SHA-256 of every file of ``directory``, written last (atomically)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    return write_text_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def verify(directory: str | Path) -> str | None:
    """What does not match the manifest (naming the file), or None when every file matches it."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing: it was not completed"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is not a manifest ({exc})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest says {expected['size']} (truncated or altered)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its SHA-256 in the manifest (altered)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
