"""YAML loading that remembers where every value came from.

PyYAML's composer gives nodes with start marks; we build plain Python objects from them and
keep a map from each value's path (a tuple of keys and list indices) to its (line, col). That
map turns a pydantic error location into `spec.yaml:12:5`. Duplicate keys, which PyYAML
silently resolves last-one-wins, are reported as problems instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import Problem, SpecError

Path = tuple[str | int, ...]


@dataclass
class Located:
    """A parsed YAML document plus the position of every value and every mapping key."""

    data: Any
    lines: list[str]
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: Path, *, key: bool = False) -> tuple[int, int] | None:
        """Position of `path`, or of its nearest ancestor that exists in the document."""
        table = self.keys if key else self.values
        for cut in range(len(path), -1, -1):
            where = table.get(path[:cut]) or self.values.get(path[:cut])
            if where:
                return where
        return None

    def snippet(self, line: int, col: int, context: int = 0) -> str:
        """The offending line (plus `context` lines around it), numbered, with a caret."""
        first, last = max(1, line - context), min(len(self.lines), line + context)
        width = len(str(last))
        out = []
        for n in range(first, last + 1):
            out.append(f"  {n:>{width}} | {self.lines[n - 1]}")
            if n == line:
                out.append(f"  {'':>{width}} | {' ' * (col - 1)}^")
        return "\n".join(out)

    def problem(self, path: Path, message: str, hint: str | None = None, *, key=False) -> Problem:
        where = self.position(path, key=key)
        line, col = where if where else (None, None)
        return Problem(
            path=dotted(path), message=message, hint=hint, line=line, col=col,
            snippet=self.snippet(line, col) if line else None,
        )


def dotted(path: Path) -> str:
    """('intents', 0, 'name') -> 'intents[0].name'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load(text: str, file: str) -> Located:
    """Parse `text`; raise SpecError for syntax errors or duplicate keys, all at once."""
    lines = text.splitlines()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise SpecError(file, [_syntax_problem(exc, lines)]) from None
    located = Located(data=None, lines=lines)
    duplicates: list[Problem] = []
    if node is None:
        located.data = {}
        return located
    located.data = _build(node, (), located, duplicates)
    if duplicates:
        raise SpecError(file, duplicates)
    return located


def _syntax_problem(exc: yaml.MarkedYAMLError, lines: list[str]) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    what = exc.problem or "invalid YAML"
    if exc.context:
        what = f"{what} {exc.context}"
    if mark is not None and mark.line >= len(lines) and exc.context_mark is not None:
        mark = exc.context_mark  # an error at end of file is best shown where it started
    line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
    snippet = Located(None, lines).snippet(line, col, context=2) if line and lines else None
    return Problem("", f"YAML syntax error: {what}", "fix the YAML syntax at this position",
                   line, col, snippet)


def _build(node: yaml.Node, path: Path, located: Located, dups: list[Problem]) -> Any:
    located.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(_scalar(key_node))  # complex keys are not valid spec keys anyway
            child = path + (key,)
            if key in out:
                first = located.keys[child]
                line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                dups.append(Problem(
                    dotted(child), f"duplicate key (first defined at line {first[0]})",
                    "remove one of the two", line, col, located.snippet(line, col)))
                continue
            located.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _build(value_node, child, located, dups)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), located, dups) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)
