"""Typed stage outputs: a directory of files plus `artifact.json` (kind, schema_version, digest).

The digest covers every file's relative path and bytes, so two artifacts with the same digest
are interchangeable and a downstream stage keyed on it rebuilds only when content changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .runtime.format import sha256_file

MANIFEST = "artifact.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: str
    digest: str
    meta: dict

    def file(self, name: str) -> Path:
        return self.path / name


def tree_digest(root: Path) -> str:
    """sha256 over (relative path, file sha256) pairs, excluding the manifest itself."""
    outer = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p != root / MANIFEST):
        rel = path.relative_to(root).as_posix()
        outer.update(rel.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return outer.hexdigest()


def seal(root: Path, kind: str, meta: dict) -> Artifact:
    """Write artifact.json for a finished directory and return it as an Artifact."""
    digest = tree_digest(root)
    record = {"kind": kind, "schema_version": SCHEMA_VERSION, "digest": digest, **meta}
    (root / MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True))
    return Artifact(root, kind, digest, meta)


def open_artifact(root: Path, verify: bool = True) -> Artifact | None:
    """The artifact at `root`, or None when it is missing, unreadable or does not match its digest."""
    try:
        record = json.loads((root / MANIFEST).read_text())
        kind, digest = record["kind"], record["digest"]
        if record.get("schema_version") != SCHEMA_VERSION:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if verify and tree_digest(root) != digest:
        return None
    meta = {k: v for k, v in record.items() if k not in ("kind", "digest", "schema_version")}
    return Artifact(root, kind, digest, meta)
