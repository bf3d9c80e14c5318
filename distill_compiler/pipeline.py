"""The stages in order, their cache keys, `plan()` with reasons, and `build()`.

A stage's key is sha256 over (stage name, VERSION, the spec sections it is keyed on, the
digests of its input artifacts, or of the files it READS from them, and of the external files
it reads). A stage only ever sees those sections (`SpecView`), so its key cannot miss a field it
reads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .artifacts import Artifact
from .cache import Store, compile_lock, read_lock, write_json_atomic
from .errors import StageError, UsageError
from .runtime.format import sha256_file
from .spec.models import Spec, keyed_values
from .stages import bundle, curate, evaluate, export, generate, train
from .students.processes import launched_ranks, wait_for_everyone

# Stage modules keep heavy imports inside run(), so importing them here stays light.
STAGES: tuple[ModuleType, ...] = (generate, curate, train, export, evaluate, bundle)
STAGE_NAMES = tuple(module.__name__.rsplit(".", 1)[-1] for module in STAGES)


def default_stages() -> list[ModuleType]:
    return list(STAGES)


def stage_name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


class SpecView:
    """Read-only access to the spec sections a stage is keyed on, and nothing else."""

    def __init__(self, spec: Spec, sections: tuple[str, ...]):
        self._values = {s: getattr(spec, s) for s in sections}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(
                f"this stage is not keyed on spec section '{name}': add it to KEYED_ON") from None


class Reporter:
    """Where stages report progress; the CLI supplies a rich one, tests a silent one."""

    def log(self, message: str) -> None:
        pass

    def progress(self, description: str, total: int | None) -> Callable[[int], None]:
        return lambda n=1: None


@dataclass
class StageContext:
    stage: str
    spec: SpecView
    spec_dir: Path
    inputs: dict[str, Artifact]
    out: Path
    cache_root: Path
    reporter: Reporter = field(default_factory=Reporter)

    def log(self, message: str) -> None:
        self.reporter.log(message)


@dataclass(frozen=True)
class Project:
    """Where a spec's build lives: its directory, cache root and build directory."""

    spec: Spec
    spec_path: Path
    cache_root: Path
    build_dir: Path

    @classmethod
    def of(cls, spec: Spec, spec_path: str | Path, out: str | Path | None = None,
           cache: str | Path | None = None) -> Project:
        spec_path = Path(spec_path).resolve()
        here = spec_path.parent
        return cls(spec, spec_path,
                   Path(cache).resolve() if cache else here / ".distill",
                   Path(out).resolve() if out else here / "build" / spec.name)

    @property
    def spec_dir(self) -> Path:
        return self.spec_path.parent

    @property
    def bundle_dir(self) -> Path:
        return self.build_dir / "bundle"


# --------------------------------------------------------------------------- keys

def external_digests(module: ModuleType, spec: Spec, spec_dir: Path) -> dict[str, str]:
    files = getattr(module, "external_files", None)
    if files is None:
        return {}
    view = SpecView(spec, module.KEYED_ON)
    out = {}
    for label, path in files(view, spec_dir).items():
        if not path.is_file():
            raise UsageError(f"{label}: file not found: {path}")
        out[label] = sha256_file(path)
    return out


def input_digests(module: ModuleType, inputs: dict[str, Artifact]) -> dict[str, str]:
    """What each input contributes to the stage's key: its digest, or only that of the files
    the stage READS from it."""
    reads = getattr(module, "READS", {})
    return {name: artifact.digest_of(tuple(reads[name])) if name in reads else artifact.digest
            for name, artifact in inputs.items()}


def stage_key(name: str, version: str, sections: dict, inputs: dict[str, str],
              files: dict[str, str]) -> str:
    payload = {"stage": name, "version": version, "sections": sections, "inputs": inputs,
               "files": files}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class StagePlan:
    name: str
    status: str  # "cached" | "stale"
    reasons: list[str]
    key: str | None  # None when an upstream stage must run first
    record: dict  # what the lock will hold for this stage


def _describe(module: ModuleType, spec: Spec, project: Project,
              inputs: dict[str, str]) -> tuple[str, dict]:
    sections = keyed_values(spec, module.KEYED_ON)
    files = external_digests(module, spec, project.spec_dir)
    key = stage_key(stage_name(module), module.VERSION, sections, inputs, files)
    return key, {"key": key, "version": module.VERSION, "sections": sections,
                 "inputs": inputs, "files": files}


def plan(project: Project, stages: list[ModuleType] | None = None) -> list[StagePlan]:
    """For each stage: cached or stale, and why, without running anything."""
    store, lock = Store(project.cache_root), read_lock(project.build_dir)
    hits: dict[str, Artifact] = {}
    out: list[StagePlan] = []
    for module in stages or default_stages():
        name = stage_name(module)
        stale_upstream = [u for u in module.INPUTS if u not in hits]
        if stale_upstream:
            out.append(StagePlan(name, "stale", [f"upstream {', '.join(stale_upstream)} stale"],
                                 None, {}))
            continue
        inputs = input_digests(module, {u: hits[u] for u in module.INPUTS})
        key, record = _describe(module, project.spec, project, inputs)
        hit, problem = store.lookup(name, key)
        if hit:
            hits[name] = hit
            out.append(StagePlan(name, "cached", [], key, record))
        else:
            out.append(StagePlan(name, "stale", why_stale(lock.get(name), record, problem),
                                 key, record))
    return out


def teacher_estimate(project: Project, module: ModuleType):
    """What a stage would ask the teacher, counted without sending (teacher/estimate.py): an
    Estimate, or None for a stage that asks nothing."""
    estimate = getattr(module, "estimate", None)
    if estimate is None:
        return None
    return estimate(SpecView(project.spec, module.KEYED_ON), project.spec_dir, project.cache_root)


def confirm_spend(project: Project, module: ModuleType) -> None:
    """Stop before a stage's first paid teacher request when its estimate is over (or cannot
    be priced against) teacher.confirm_over_usd."""
    from .teacher.estimate import over_limit

    limit = project.spec.teacher.confirm_over_usd
    if limit is None:
        return
    estimate = teacher_estimate(project, module)
    why = over_limit(estimate, limit) if estimate is not None else None
    if why:
        raise StageError(stage_name(module), why)


def why_stale(previous: dict | None, current: dict, problem: str = "missing") -> list[str]:
    """Human reasons a stage's key differs from the one recorded in the lock; when it does
    not differ, what is wrong with the cache entry (`problem`, from Store.lookup)."""
    if not previous:
        return ["never built"]
    reasons = []
    if previous.get("version") != current["version"]:
        reasons.append(f"stage VERSION {previous.get('version')} -> {current['version']}")
    reasons += [f"{path}: {_short(a)} -> {_short(b)}"
                for path, a, b in diff_values(previous.get("sections", {}), current["sections"])]
    for name, digest in current["inputs"].items():
        if previous.get("inputs", {}).get(name) != digest:
            reasons.append(f"input {name} changed")
    for label, digest in current["files"].items():
        if previous.get("files", {}).get(label) != digest:
            reasons.append(f"file {label} changed")
    if reasons:
        return reasons
    return ["cache entry missing" if problem == "missing" else f"cache entry corrupt: {problem}"]


_MISSING = object()


def diff_values(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Leaf-level differences between two JSON values, as (dotted path, old, new)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{k}" if path else k
            out += diff_values(a.get(k, _MISSING), b.get(k, _MISSING), sub)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff_values(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [(path, a, b)]


def _plain(text: str) -> str:
    """Text for Reporter.log, which reads rich markup: a '[' in a path or reason stays one."""
    return text.replace("[", "\\[")


def _short(value: Any) -> str:
    if value is _MISSING:
        return "(unset)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- build

@dataclass
class StageRun:
    name: str
    cached: bool
    seconds: float
    artifact: Artifact
    summary: dict


@dataclass
class BuildResult:
    project: Project
    runs: list[StageRun]

    def summary(self, stage: str) -> dict:
        return next((r.summary for r in self.runs if r.name == stage), {})


def build(project: Project, *, until: str | None = None, force: tuple[str, ...] = (),
          reporter: Reporter | None = None, stages: list[ModuleType] | None = None,
          yes: bool = False) -> BuildResult:
    """Run every stale stage in order (up to `until`), reuse cached ones, write the lock.

    A stage that calls the teacher first checks its estimate against
    teacher.confirm_over_usd, unless `yes`."""
    stages = stages or default_stages()
    names = [stage_name(m) for m in stages]
    for name in (until, *force):
        if name is not None and name not in names:
            raise UsageError(f"unknown stage '{name}' (stages: {', '.join(names)})")
    rank, world = launched_ranks()
    if rank > 0:
        return _follow(project, stages, names[:names.index(until) + 1] if until else names)
    reporter = reporter or Reporter()
    with compile_lock(project.cache_root, lambda text: reporter.log(_plain(text))):
        return _build(project, stages, until, force, reporter, world, yes)


def _build(project: Project, stages: list[ModuleType], until: str | None,
           force: tuple[str, ...], reporter: Reporter, world: int, yes: bool) -> BuildResult:
    """build() once it holds the compile lock: no other build writes this cache now."""
    store = Store(project.cache_root)
    if swept := store.sweep_tmp():
        reporter.log(f"removed {swept} unfinished work dir(s) left in {store.root / 'tmp'} "
                     "by an interrupted build")
    lock = read_lock(project.build_dir)
    built: dict[str, Artifact] = {}
    runs: list[StageRun] = []
    followers_waiting = world > 1
    for module in stages:
        name = stage_name(module)
        if followers_waiting and name == TRAIN:
            followers_waiting = _release_followers()
        inputs = {u: built[u] for u in module.INPUTS}
        key, record = _describe(module, project.spec, project, input_digests(module, inputs))
        started = time.perf_counter()
        artifact, problem = (None, "forced") if name in force else store.lookup(name, key)
        cached = artifact is not None
        if artifact is None:
            why = "" if problem in ("missing", "forced") else \
                f" (cache entry corrupt: {problem}; rebuilding it)"
            if not yes:
                confirm_spend(project, module)
            reporter.log(f"[bold]{name}[/]: running{_plain(why)}")
            artifact = _run_stage(module, name, key, project, inputs, store, reporter)
        seconds = round(time.perf_counter() - started, 3)
        built[name] = artifact
        summary = artifact.meta.get("summary", {})
        runs.append(StageRun(name, cached, seconds, artifact, summary))
        if not cached:
            record["duration_s"] = seconds
        else:
            record["duration_s"] = lock.get(name, {}).get("duration_s")
        lock[name] = {**record, "output": artifact.digest, "summary": summary}
        write_json_atomic(project.build_dir / "distill.lock", lock)
        if name == until:
            break
    if followers_waiting:  # the build ended before train: let the other processes go
        _release_followers()
    if "bundle" in built:
        publish_bundle(built["bundle"], project.bundle_dir)
    return BuildResult(project, runs)


# --------------------------------------------------------------------------- several processes

TRAIN = "train"


def _release_followers() -> bool:
    """The main process has built (or found) everything train reads."""
    wait_for_everyone()
    return False


def _follow(project: Project, stages: list[ModuleType], names: list[str]) -> BuildResult:
    """A non-main process of a multi-process build: it trains alongside the main process (DDP
    through Trainer) and writes nothing. It waits until the main process has built what train
    reads, so the teacher is never asked twice, then runs train into a scratch directory that
    is discarded: the main process commits the checkpoint, and builds the rest alone."""
    wait_for_everyone()
    if TRAIN not in names:
        return BuildResult(project, [])
    store, built = Store(project.cache_root), {}
    for module in stages:
        name = stage_name(module)
        inputs = {u: built[u] for u in module.INPUTS}
        key, _ = _describe(module, project.spec, project, input_digests(module, inputs))
        if name == TRAIN:
            if store.get(name, key) is None:
                with store.workdir(name) as scratch:
                    module.run(StageContext(name, SpecView(project.spec, module.KEYED_ON),
                                            project.spec_dir, inputs, scratch, project.cache_root))
            return BuildResult(project, [])
        built[name] = store.get(name, key)
        if built[name] is None:
            raise UsageError(f"{name}: not in the cache after the main process built it "
                             f"({project.cache_root} must be shared by every process)")
    return BuildResult(project, [])


def _run_stage(module: ModuleType, name: str, key: str, project: Project,
               inputs: dict[str, Artifact], store: Store, reporter: Reporter) -> Artifact:
    meta: dict = {}  # filled by produce(); commit() reads it only after produce() returns

    def produce(tmp: Path) -> None:
        ctx = StageContext(name, SpecView(project.spec, module.KEYED_ON), project.spec_dir,
                           inputs, tmp, project.cache_root, reporter)
        meta["summary"] = module.run(ctx) or {}

    return store.commit(name, key, module.KIND, meta, produce)


def publish_bundle(artifact: Artifact, target: Path) -> None:
    """Copy the bundle artifact to `<build>/bundle`, replacing the old one at once.

    The copy is made beside the target (`.bundle.new`) and swapped in: a build killed at any
    point leaves the old bundle or the new one at `target`, never part of either (where the
    file system cannot swap two directories in one step, a kill between the two renames
    leaves none there). What a kill leaves beside it (`.bundle.new`, `.bundle.old`) is
    removed by the next publish.
    """
    staging = target.with_name(f".{target.name}.new")
    old = target.with_name(f".{target.name}.old")
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(artifact.path, staging)
    (staging / "artifact.json").unlink(missing_ok=True)
    if not target.exists():
        staging.rename(target)
    elif _exchange(staging, target):  # staging now holds the old bundle
        shutil.rmtree(staging, ignore_errors=True)
    else:  # no atomic exchange here: a kill between these renames leaves no bundle at target
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or file system cannot."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
