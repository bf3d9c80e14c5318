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
    # Unquoted scalars YAML did not read as strings: path -> (text as written, what it became).
    read_as: dict[Path, tuple[str, str]] = field(default_factory=dict)

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
            text, caret = _window(self.lines[n - 1], col if n == line else 1)
            out.append(f"  {n:>{width}} | {text}")
            if n == line:
                out.append(f"  {'':>{width}} | {' ' * (caret - 1)}^")
        return "\n".join(out)

    def not_a_string(self, path: Path) -> tuple[str, str] | None:
        """Message and hint for a value that is not a string only because YAML read it as
        one of its implicit types (`yes` as a boolean, `404` as a number), or None."""
        if path not in self.read_as:
            return None
        written, became = self.read_as[path]
        why = f"; {YAML11_BOOLEANS}" if became == "a boolean" else ""
        return (f"{written} was read as {became}, not a string{why}",
                f"quote it ('{written}') to keep it a name")

    def problem(self, path: Path, message: str, hint: str | None = None, *, key=False) -> Problem:
        where = self.position(path, key=key)
        line, col = where if where else (None, None)
        return Problem(
            path=dotted(path), message=message, hint=hint, line=line, col=col,
            snippet=self.snippet(line, col) if line else None,
        )


SNIPPET_WIDTH = 100


def _window(text: str, col: int) -> tuple[str, int]:
    """At most SNIPPET_WIDTH characters of a line around `col` (a minified line can be
    megabytes), and where `col` lands in them."""
    if len(text) <= SNIPPET_WIDTH:
        return text, col
    start = max(0, min(col - 1 - SNIPPET_WIDTH // 2, len(text) - SNIPPET_WIDTH))
    head = "..." if start else ""
    tail = "..." if start + SNIPPET_WIDTH < len(text) else ""
    return head + text[start:start + SNIPPET_WIDTH] + tail, col - start + len(head)


def dotted(path: Path) -> str:
    """('intents', 0, 'name') -> 'intents[0].name'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# Bounds on what a spec may expand to. A real spec is a few hundred values a few levels deep;
# these stop an alias bomb (`&a [*a, *a]` repeated) or a recursive anchor from hanging or
# overflowing the stack, and keep every later recursive walk (pydantic, jsonschema) shallow.
MAX_DEPTH = 64
MAX_VALUES = 100_000

CORE = "tag:yaml.org,2002:"
# Explicit tags a spec may use, by node kind: the YAML core types SafeLoader constructs.
SCALAR_TAGS = {CORE + t for t in ("str", "int", "float", "bool", "null", "timestamp", "binary")}
KIND_TAGS = {yaml.ScalarNode: SCALAR_TAGS, yaml.SequenceNode: {CORE + "seq"},
             yaml.MappingNode: {CORE + "map"}}
# How a plain (unquoted) scalar that was not read as a string is described, by its YAML tag.
READ_AS = {CORE + "bool": "a boolean", CORE + "null": "null", CORE + "int": "a number",
           CORE + "float": "a number", CORE + "timestamp": "a date"}
YAML11_BOOLEANS = "YAML 1.1 reads unquoted yes/no/on/off/true/false as booleans"


def load(text: str, file: str) -> Located:
    """Parse `text`; raise SpecError for syntax errors, unusable tags or values, or duplicate
    keys, all at once."""
    lines = text.splitlines()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise SpecError(file, [_syntax_problem(exc, lines)]) from None
    except yaml.reader.ReaderError as exc:
        raise SpecError(file, [character_problem(text, exc.position)]) from None
    except RecursionError:  # the composer recurses once per level; the parser does not
        raise SpecError(file, [_too_deep(text, lines)]) from None
    located = Located(data=None, lines=lines)
    if node is None:
        located.data = {}
        return located
    builder = _Builder(located)
    located.data = builder.build(node, (), 0)
    if builder.problems:
        raise SpecError(file, builder.problems)
    return located


def _too_deep(text: str, lines: list[str]) -> Problem:
    """Where nesting first passes MAX_DEPTH, found by the (iterative) event parser."""
    depth, line, col = 0, None, None
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                line, col = event.start_mark.line + 1, event.start_mark.column + 1
                break
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    snippet = Located(None, lines).snippet(line, col) if line else None
    return Problem("", f"nested more than {MAX_DEPTH} levels deep", "flatten the nesting",
                   line, col, snippet)


def character_problem(text: str, index: int, what: str = "YAML") -> Problem:
    """A character the YAML reader refuses (NUL, other control characters, lone surrogates,
    U+FFFE), located by its index in `text`; the snippet shows it escaped, not raw."""
    line, col, row = _line_col(text, index)
    char = text[index] if index < len(text) else ""
    shown = text.splitlines() or [""]
    shown[line - 1] = escaped(row)
    snippet = Located(None, shown).snippet(line, len(escaped(row[:col - 1])) + 1)
    return Problem("", f"{what} cannot contain the character {_codepoint(char)}",
                   "delete it; inside a double-quoted string write it as an escape "
                   r"such as \u0007", line, col, snippet)


def _line_col(text: str, index: int) -> tuple[int, int, str]:
    """1-based line and column of `index`, and that line's text (split as splitlines does)."""
    start = 0
    rows = text.splitlines(keepends=True) or [""]
    for number, row in enumerate(rows, 1):
        if index < start + len(row) or number == len(rows):
            return number, index - start + 1, row.rstrip("\r\n")
        start += len(row)
    return 1, 1, ""


def _codepoint(char: str) -> str:
    names = {"\x00": " (NUL)", "\x1b": " (ESC)", "\x7f": " (DEL)"}
    return f"U+{ord(char):04X}{names.get(char, '')}" if char else "at end of input"


def escaped(text: str) -> str:
    """`text` with every character a terminal should not print written as an escape."""
    return "".join(c if c.isprintable() or c == "\t" else
                   c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)


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


def short_tag(tag: str) -> str:
    return "!!" + tag[len(CORE):] if tag.startswith(CORE) else tag


class _Builder:
    """Builds plain Python values from composed nodes, recording positions and collecting
    problems (duplicate keys, foreign tags, unreadable scalars, alias loops) instead of raising."""

    def __init__(self, located: Located):
        self.located, self.problems = located, []
        self.values_built = 0
        self.active: set[int] = set()  # nodes being built: an alias back to one is a loop

    def problem(self, node: yaml.Node, path: Path | str, message: str, hint: str) -> None:
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        where = path if isinstance(path, str) else dotted(path)
        self.problems.append(Problem(where, message, hint, line, col,
                                     self.located.snippet(line, col)))

    def build(self, node: yaml.Node, path: Path, depth: int) -> Any:
        self.located.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        self.values_built += 1
        if self.values_built > MAX_VALUES:
            if self.values_built == MAX_VALUES + 1:
                self.problem(node, path, f"the spec expands to over {MAX_VALUES} values",
                             "aliases (*name) repeat whole sections; write them out once")
            return None
        if id(node) in self.active:
            self.problem(node, path, "an alias (*name) inside the value anchored here refers "
                         "back to it", "remove the alias loop")
            return None
        if depth > MAX_DEPTH:
            self.problem(node, dotted(path[:8]) + "...", f"nested more than {MAX_DEPTH} levels deep",
                         "flatten the nesting")
            return None
        if not self.tag_fits(node, path):
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path, depth)
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
            return self.scalar(node, path)
        finally:
            self.active.discard(id(node))

    def tag_fits(self, node: yaml.Node, path: Path) -> bool:
        allowed = KIND_TAGS[type(node)]
        if node.tag in allowed:
            return True
        kind = {yaml.ScalarNode: "a plain value", yaml.SequenceNode: "a list",
                yaml.MappingNode: "a mapping"}[type(node)]
        known = any(node.tag in tags for tags in KIND_TAGS.values())
        message = (f"the tag {short_tag(node.tag)} does not fit {kind}" if known
                   else f"unknown YAML tag {short_tag(node.tag)}")
        self.problem(node, path, message, "a spec holds plain values: remove the tag")
        return False

    def mapping(self, node: yaml.MappingNode, path: Path, depth: int) -> dict:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, path, "a key must be a plain name, not a list or mapping",
                             "write the key as a name")
                continue
            # The key as written: `on:` or `yes:` stay those names, not "True".
            key = key_node.value
            child = path + (key,)
            if key in out:
                first = self.located.keys[child]
                self.problem(key_node, child, f"duplicate key (first defined at line {first[0]})",
                             "remove one of the two")
                continue
            self.located.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = self.build(value_node, child, depth + 1)
        return out

    def scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        try:
            value = yaml.SafeLoader("").construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError,
                OverflowError):  # the constructors' errors on e.g. `!!int x`
            self.problem(node, path, f"cannot read {_quoted(node.value)} as {short_tag(node.tag)}",
                         "fix the value or remove the tag")
            return None
        if node.style is None and node.tag in READ_AS and not isinstance(value, str):
            self.located.read_as[path] = (node.value, READ_AS[node.tag])
        return value


def _quoted(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
