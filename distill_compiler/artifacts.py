"""Typed stage outputs: a directory of files plus `artifact.json` (kind, schema_version, digest).

The digest covers every file's relative path and bytes, so two artifacts with the same digest
are interchangeable and a downstream stage keyed on it rebuilds only when content changes.
`artifact.json` also lists each file's sha256, so an entry truncated or edited by hand is
not only refused but named: which file changed, went missing or appeared.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
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
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256

    def file(self, name: str) -> Path:
        return self.path / name

    def digest_of(self, names: tuple[str, ...]) -> str:
        """The digest of some of its files: what a stage that reads only those is keyed on.
        The whole artifact's digest when one of them is not listed (an artifact sealed before
        artifact.json listed its files, or one without that file)."""
        if not all(name in self.files for name in names):
            return self.digest
        return digest_of({name: self.files[name] for name in names})


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by relative path, the manifest excluded."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p != root / MANIFEST}


def digest_of(files: dict[str, str]) -> str:
    """sha256 over (relative path, file sha256) pairs in path order."""
    outer = hashlib.sha256()
    for rel in sorted(files):
        outer.update(rel.encode() + b"\0" + files[rel].encode() + b"\n")
    return outer.hexdigest()


def tree_digest(root: Path) -> str:
    return digest_of(file_digests(root))


def seal(root: Path, kind: str, meta: dict) -> Artifact:
    """Write artifact.json for a finished directory and return it as an Artifact."""
    files = file_digests(root)
    digest = digest_of(files)
    record = {"kind": kind, "schema_version": SCHEMA_VERSION, "digest": digest, "files": files,
              **meta}
    (root / MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True))
    return Artifact(root, kind, digest, meta, files)


def open_artifact(root: Path, verify: bool = True) -> Artifact | None:
    """The artifact at `root`, or None when it is missing, unreadable or does not match its digest."""
    return check_artifact(root, verify)[0]


def check_artifact(root: Path, verify: bool = True) -> tuple[Artifact | None, str]:
    """(the artifact, "") or (None, why it cannot be used: "missing" or what is wrong)."""
    if not root.is_dir():
        return None, "missing"
    try:
        record = json.loads((root / MANIFEST).read_text())
        kind, digest = record["kind"], record["digest"]
    except FileNotFoundError:
        return None, f"no {MANIFEST} (left unfinished or damaged)"
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{MANIFEST} unreadable (truncated or edited)"
    if record.get("schema_version") != SCHEMA_VERSION:
        return None, f"{MANIFEST} schema_version {record.get('schema_version')!r} is not {SCHEMA_VERSION}"
    if verify:
        files = file_digests(root)
        if digest_of(files) != digest:
            return None, _what_changed(record.get("files"), files)
    meta = {k: v for k, v in record.items()
            if k not in ("kind", "digest", "schema_version", "files")}
    files = record.get("files")
    return Artifact(root, kind, digest, meta, files if isinstance(files, dict) else {}), ""


def _what_changed(recorded, found: dict[str, str]) -> str:
    if not isinstance(recorded, dict):  # sealed before artifact.json listed its files
        return "its files do not match the digest in artifact.json (truncated or edited)"
    changed = sorted(r for r in found if r in recorded and recorded[r] != found[r])
    missing = sorted(set(recorded) - set(found))
    extra = sorted(set(found) - set(recorded))
    parts = ([f"{', '.join(changed[:3])} changed"] if changed else []) + \
            ([f"{', '.join(missing[:3])} missing"] if missing else []) + \
            ([f"{', '.join(extra[:3])} not in it"] if extra else [])
    return "; ".join(parts or ["artifact.json does not match its file list"]) + \
        " since it was committed (truncated or edited)"
