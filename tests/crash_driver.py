"""The `distill` CLI in a subprocess that stops at a named point: what a crash drill kills.

    python tests/crash_driver.py POINT SIGNAL_FILE distill-args...

Everything runs as `distill` would (distill_compiler.cli.main), with one function wrapped so
that at POINT the process writes its pid to SIGNAL_FILE and waits until SIGNAL_FILE.go exists.
The drill synchronises on SIGNAL_FILE, then kills the process with SIGKILL (or releases it).
POINT `none` wraps nothing. The points, each inside a real stage or the publish:

    train-step       fine-tuning, after its 2nd optimiser step
    checkpoint-half  the checkpoint half written: model/ saved, labels.json and train_log.json not
    sealed:STAGE     STAGE's work dir complete and sealed (artifact.json), not yet renamed into store/
    bundle-writing   the bundle stage after its first file (report.json), before the manifest
    publish-copying  the bundle's copy beside build/<name>/bundle after 3 of its files
    publish-swapped  the new bundle swapped in, the old one not yet deleted
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path


def pause(signal: Path) -> None:
    tmp = signal.with_name(signal.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(signal)
    go = signal.with_name(signal.name + ".go")
    while not go.exists():
        time.sleep(0.01)


def after(owner, name: str, signal: Path, when=lambda *a, **k: True) -> None:
    """Wrap owner.name: once it has returned for a call `when` accepts, pause."""
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if when(*args, **kwargs):
            pause(signal)
        return result

    setattr(owner, name, wrapper)


def nth(n: int):
    calls = 0

    def when(*args, **kwargs) -> bool:
        nonlocal calls
        calls += 1
        return calls == n
    return when


def install(point: str, signal: Path) -> None:
    if point == "none":
        return
    if point == "train-step":
        from distill_compiler.students.classifier import train
        after(train, "train_step", signal, nth(2))
    elif point == "checkpoint-half":
        from distill_compiler.students.classifier.model import PooledClassifier
        after(PooledClassifier, "save", signal)
    elif point.startswith("sealed:"):
        from distill_compiler import cache
        stage = point.split(":", 1)[1]
        after(cache, "seal", signal, lambda root, kind, meta: meta["stage"] == stage)
    elif point == "bundle-writing":
        from distill_compiler.stages import bundle
        after(bundle, "write_json", signal, nth(1))
    elif point == "publish-copying":
        import shutil
        import types

        from distill_compiler import pipeline
        copied = nth(3)

        def copy(src, dst, **kwargs):
            out = shutil.copy2(src, dst, **kwargs)
            if copied():
                pause(signal)
            return out

        def copytree(src, dst, **kwargs):
            return shutil.copytree(src, dst, copy_function=copy, **kwargs)
        # publish_bundle's shutil only: the stages copy files through the real one.
        pipeline.shutil = types.SimpleNamespace(**{**vars(shutil), "copytree": copytree})
    elif point == "publish-swapped":
        from distill_compiler import pipeline
        after(pipeline, "_exchange", signal)
    else:
        raise SystemExit(f"crash_driver: unknown point {point!r}")


def main() -> None:
    point, signal, *argv = sys.argv[1:]
    install(point, Path(signal))
    from distill_compiler.cli import main as distill

    distill(argv)


if __name__ == "__main__":
    main()
