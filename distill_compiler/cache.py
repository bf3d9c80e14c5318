"""Content-addressed artifact store with atomic commits, and the build's lock file.

Layout under the cache root (default `.distill/` beside the spec):
    store/<stage>/<key>/   one committed artifact per stage key
    tmp/                   work directories; renamed into store/ only once complete
    teacher.sqlite         the per-request teacher cache (see teacher.py)
A stage killed half-way leaves only a tmp/ directory, which is never read: no cache entry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .artifacts import Artifact, open_artifact, seal

LOCK_NAME = "distill.lock"


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / "store" / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The committed artifact for this key; a missing or corrupt entry is a miss."""
        return open_artifact(self.entry(stage, key))

    def commit(self, stage: str, key: str, kind: str, meta: dict,
               produce: Callable[[Path], None]) -> Artifact:
        """Run `produce(tmpdir)`, seal the result and move it into place atomically."""
        with self.workdir(stage) as tmp:
            produce(tmp)
            # `meta` is read only now, so produce() may fill it (the stage's summary).
            seal(tmp, kind, {"stage": stage, "key": key, **meta})
            final = self.entry(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a corrupt entry under this key: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        artifact = open_artifact(final, verify=False)
        assert artifact is not None
        return artifact

    @contextmanager
    def workdir(self, stage: str):
        """A private temp directory, removed on any exit unless it was renamed away."""
        base = self.root / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"{stage}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)


def read_lock(build_dir: Path) -> dict:
    try:
        return json.loads((build_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so that readers see the old file or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
