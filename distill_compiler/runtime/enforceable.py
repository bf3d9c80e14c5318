"""Which JSON Schemas constrained decoding enforces: exactly those llguidance compiles.

The runtime hands schemas to llguidance (constrained.py); this module owns what it hands over
(`decoding_schema`) and finds out, by compiling that, whether a schema can be enforced and where
it cannot (`schema_problems`). It imports llguidance but not numpy, so `distill check` can call
it without the runtime's heavier libraries.

    schema_problems(schema)   # [] or [(("properties", "id", "pattern"), "'pattern' cannot ...")]

llguidance reports one error, without saying where. The keyword is found by compiling variants:
the deepest subschema whose replacement by `{}` changes the error holds it, and of that
subschema's keywords the one whose removal changes it is reported. It is then dropped and the
schema compiled again, so every problem is listed at once.
"""

from __future__ import annotations

import json
import re

import llguidance

SEPARATORS = (", ", ": ")  # json.dumps's defaults: what the students are trained on
# No whitespace but the separators: the layout of the training targets, one token sequence each.
COMPILE_OPTIONS = {"item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1],
                   "whitespace_flexible": False}
MAX_PROBLEMS = 20

# Where a schema holds subschemas (JSON Schema 2020-12 applicators, and draft 7's spellings).
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalItems", "additionalProperties", "propertyNames",
                 "contains", "not", "if", "then", "else", "unevaluatedItems",
                 "unevaluatedProperties")
# Words of llguidance's messages that name a keyword other than by its spelling.
ALIASES = {"pattern": ("regex",), "$ref": ("Pointer",)}


class SchemaNotEnforceable(ValueError):
    """A schema llguidance cannot compile; `problems` lists them as 'json.path: message'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the schema cannot be enforced by constrained decoding:\n  "
                         + "\n  ".join(problems))


# --------------------------------------------------------------------------- what is compiled

def decoding_schema(schema: dict) -> dict:
    """`schema` as the runtime compiles it: the training layout (COMPILE_OPTIONS) and objects
    closed to their declared properties where the schema does not say what else may appear, so
    the student writes the keys it was trained on and nothing else (still valid either way)."""
    return {**_closed(schema), "x-guidance": COMPILE_OPTIONS}


def _closed(schema):
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
    for key in SCHEMA_VALUES:
        if key in out:
            out[key] = ([_closed(s) for s in out[key]] if isinstance(out[key], list)
                        else _closed(out[key]))
    if _is_object(out) and not {"additionalProperties", "patternProperties",
                                "unevaluatedProperties"} & set(out):
        out["additionalProperties"] = False
    return out


def _is_object(schema: dict) -> bool:
    types = schema.get("type")
    return "properties" in schema or types == "object" or (
        isinstance(types, list) and "object" in types)


def compile_error(schema: object) -> str:
    """llguidance's error for `decoding_schema(schema)`, '' when it compiles."""
    if not isinstance(schema, dict):
        return f"a schema must be an object, not {json.dumps(schema)}"
    grammar = llguidance.LLMatcher.grammar_from_json_schema(decoding_schema(schema))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else ""


# --------------------------------------------------------------------------- where it fails

def schema_problems(schema: object) -> list[tuple[tuple, str]]:
    """Every reason llguidance cannot compile `schema`, as (keyword path, message)."""
    problems: list[tuple[tuple, str]] = []
    error = compile_error(schema)
    while error and isinstance(schema, dict) and len(problems) < MAX_PROBLEMS:
        path = _locate(schema, error)
        problems.append((path, _message(path, error)))
        if not path:
            break
        schema = _without(schema, path)
        following = compile_error(schema)
        if following == error:  # dropping the keyword did not help: stop rather than repeat
            break
        error = following
    if error and not problems:
        problems.append(((), _message((), error)))
    return problems


def check_schema(schema: object) -> list[str]:
    """schema_problems as 'json.path: message' ('<root>' for the schema itself); [] if none."""
    return [f"{'.'.join(map(str, path)) or '<root>'}: {message}"
            for path, message in schema_problems(schema)]


def _locate(root: dict, error: str) -> tuple:
    """The path of the keyword behind `error` (see the module docstring)."""
    here: tuple = ()
    descended = True
    while descended:
        descended = False
        node = _get(root, here)
        # Subschemas without a $ref first: along a chain of $refs, every link "holds" the
        # error, but the keyword is in the one that refers to nothing.
        for child in sorted(_children(node), key=lambda c: '"$ref"' in json.dumps(_get(node, c))):
            if compile_error(_replaced(root, here + child, {})) != error:
                here, descended = here + child, True
                break
    node = _get(root, here)
    for key in sorted(node, key=lambda k: not _named_in(k, error)):
        if compile_error(_replaced(root, here, {k: v for k, v in node.items() if k != key})) != error:
            return here + (key,)
    return here


def _children(node: object) -> list[tuple]:
    if not isinstance(node, dict):
        return []
    out = []
    for key in SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out += [(key, name) for name in node[key]]
    for key in (*SCHEMA_LISTS, *SCHEMA_VALUES):
        value = node.get(key)
        if isinstance(value, list):
            out += [(key, i) for i in range(len(value))]
        elif isinstance(value, dict):
            out.append((key,))
    return out


def _named_in(key: str, error: str) -> bool:
    words = (key, *ALIASES.get(key, ()))
    return any(re.search(rf"(?<![\w$]){re.escape(w)}(?!\w)", error) for w in words)


def _get(root, path: tuple):
    for part in path:
        root = root[part]
    return root


def _replaced(root, path: tuple, value):
    """A copy of `root` with the value at `path` replaced (copied along the path only)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = list(root) if isinstance(root, list) else dict(root)
    copy[head] = _replaced(root[head], rest, value)
    return copy


def _without(root, path: tuple):
    parent = _get(root, path[:-1])
    if isinstance(parent, dict):
        return _replaced(root, path[:-1], {k: v for k, v in parent.items() if k != path[-1]})
    return _replaced(root, path, {})


def _message(path: tuple, error: str) -> str:
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if lines and lines[0].startswith("regex parse error"):
        lines = [lines[-1].removeprefix("error: ")]  # the reason; the caret art says no more
    reason = " ".join(lines)
    what = f"'{path[-1]}'" if path and isinstance(path[-1], str) else "this schema"
    return f"{what} cannot be enforced by constrained decoding (llguidance: {reason})"
