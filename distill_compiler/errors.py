"""Errors a user can act on, and the exit codes the CLI maps them to.

Everything a user can cause (a bad spec, a stage that cannot finish, a spent budget) is a
`DistillError`; the CLI prints it without a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Exit codes live here and nowhere else.
EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class DistillError(Exception):
    """Base class: a problem the user can fix, printed without a traceback."""

    exit_code = EXIT_STAGE_FAILED

    def render(self) -> str:
        return f"error: {self}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, located at a dotted path and (when known) a position."""

    path: str
    message: str
    hint: str | None = None
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based
    snippet: str | None = None

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}:{self.col}" if self.line else file
        head = f"{where}: error: {self.path or '<root>'}: {self.message}"
        if self.hint:
            head += f" ({self.hint})"
        return head + (f"\n{self.snippet}" if self.snippet else "")


@dataclass
class SpecError(DistillError):
    """A spec that cannot be used; carries every problem found, not just the first."""

    file: str
    problems: list[Problem] = field(default_factory=list)
    exit_code = EXIT_USAGE

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        n = len(self.problems)
        body = "\n".join(p.render(self.file) for p in self.problems)
        return f"{body}\n{self.file}: {n} problem{'s' if n != 1 else ''} found"


class StageError(DistillError):
    """A pipeline stage that could not produce its artifact; says which and what to do."""

    def __init__(self, stage: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.stage, self.message, self.hint = stage, message, hint

    def render(self) -> str:
        text = f"error: stage {self.stage}: {self.message}"
        return text + (f"\n  hint: {self.hint}" if self.hint else "")


class UsageError(DistillError):
    """Bad command-line input that is not a spec problem (missing file, bad --set)."""

    exit_code = EXIT_USAGE
