"""Content-addressed artifact store with atomic commits, the build's lock file, and the
compile lock that keeps two builds from writing one cache at once.

Layout under the cache root (default `.distill/` beside the spec):
    store/<stage>/<key>/   one committed artifact per stage key
    tmp/                   work directories; renamed into store/ only once complete
    teacher.sqlite         the per-request teacher cache (see teacher.py)
    compile.lock           held (flock) by the build writing this cache; says who holds it
A stage killed half-way leaves only a tmp/ directory, which is never read: no cache entry.
The next build to take the compile lock removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .artifacts import Artifact, check_artifact, open_artifact, seal

try:
    import fcntl
except ImportError:  # Windows: no flock; builds there are not serialised
    fcntl = None

LOCK_NAME = "distill.lock"
COMPILE_LOCK = "compile.lock"


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / "store" / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The committed artifact for this key; a missing or corrupt entry is a miss."""
        return open_artifact(self.entry(stage, key))

    def lookup(self, stage: str, key: str) -> tuple[Artifact | None, str]:
        """`get`, and when it misses, why: "missing", or what is wrong with the entry."""
        return check_artifact(self.entry(stage, key))

    def commit(self, stage: str, key: str, kind: str, meta: dict,
               produce: Callable[[Path], None]) -> Artifact:
        """Run `produce(tmpdir)`, seal the result and move it into place atomically."""
        with self.workdir(stage) as tmp:
            produce(tmp)
            # `meta` is read only now, so produce() may fill it (the stage's summary).
            seal(tmp, kind, {"stage": stage, "key": key, **meta})
            final = self.entry(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                # A corrupt entry under this key: move it out of store/ in one rename before
                # deleting it, so a kill now leaves the old entry whole or gone, never half.
                trash = self.root / "tmp" / f"{stage}-replaced-{uuid.uuid4().hex[:12]}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
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

    def sweep_tmp(self) -> int:
        """Remove what killed builds left in tmp/; only safe while holding the compile lock."""
        base = self.root / "tmp"
        left = list(base.iterdir()) if base.is_dir() else []
        for path in left:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(left)


@contextmanager
def compile_lock(cache_root: Path, on_wait: Callable[[str], None]) -> Iterator[None]:
    """Hold the cache's compile lock for a whole build; wait (saying for whom) while another
    process holds it.

    Why: two builds of one cache would otherwise write the same store entries, the teacher
    cache and the published bundle at once (one replacing an entry the other is reading).
    Why flock: the kernel drops the lock when its holder exits, however it exits (kill -9
    included), so a dead build never blocks the next one and there is no stale lock to clean
    up. The pid and start time written into the file only say who holds it.
    """
    if fcntl is None:
        yield
        return
    path = Path(cache_root) / COMPILE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(f"waiting for the build lock held by {_holder(path)} ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} (started {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another build"


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
