"""Run the `distill` CLI in-process, as a user would, and return its exit code."""

from distill_compiler.cli import main


def cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code or 0
    return 0
